"""Prediction speed: bare base model vs LoRA unmerged vs merged vs ONNX, on SST-2 validation.

    .venv/bin/python benchmarks/predict_latency.py --data /work/shared/data/sst2/validation.tsv

MiniLM (the embedded model) with LoRA r=8 on query, key, value, dense and random nonzero
lora_B, so the unmerged branch really computes. Every variant runs the same ``Predictor`` path
(tokenize, length-sorted batches, forward, softmax). Batch-1 latency is taken per sentence
(median and 90th percentile); batch-64 throughput over all sentences, each batch timed
``--repeats`` times (median). The variants take turns sentence by sentence and batch by
batch, so drifts in machine speed hit them alike. Run it on an otherwise idle machine.
Prints a markdown table for docs/benchmarks-log.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lorakit import apply_lora_to_model, save_adapter
from lorakit.data import read_file
from lorakit.export import export_onnx
from lorakit.models import load_model, load_tokenizer
from lorakit.predict import Predictor
from lorakit.state import unwrap_lora

LABELS = {0: "negative", 1: "positive"}
TARGETS = ["query", "key", "value", "dense"]


def build(folder: Path, bf16: bool) -> dict[str, Predictor]:
    """The predictors to compare, all on the same weights."""
    tokenizer = load_tokenizer("minilm")
    base = load_model("minilm", LABELS).eval()
    lora = copy.deepcopy(base)
    apply_lora_to_model(lora, TARGETS, rank=8, alpha=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    merged = copy.deepcopy(lora)
    unwrap_lora(merged)
    save_adapter(lora, folder / "adapter", base_model_name_or_path="minilm", task="sst2")
    export_onnx(folder / "adapter", folder / "model.onnx")
    cpu = torch.device("cpu")
    predictors = {
        "bare base model": Predictor.from_model(base, tokenizer, cpu),
        "LoRA unmerged": Predictor.from_model(lora, tokenizer, cpu),
        "LoRA merged": Predictor.from_model(merged, tokenizer, cpu),
        "ONNX (onnxruntime)": Predictor.from_onnx(folder / "model.onnx"),
    }
    if bf16:
        predictors["LoRA merged, bf16 autocast"] = Predictor.from_model(
            merged, tokenizer, cpu, torch.bfloat16
        )
    return predictors


def in_turns(predictors: dict[str, Predictor], i: int) -> list[tuple[str, Predictor]]:
    """The variants in turn for item ``i``, rotated so that none always runs first or last."""
    items = list(predictors.items())
    k = i % len(items)
    return items[k:] + items[:k]


def latencies(predictors: dict[str, Predictor], texts: list[str]) -> dict[str, list[float]]:
    """Seconds per single-sentence call, the variants taking turns sentence by sentence.

    Taking turns puts every variant under the same background load (this VM's speed drifts
    and other jobs come and go), so the differences between the medians are the variants'.
    """
    for predictor in predictors.values():
        predictor.predict(texts[:10])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for i, text in enumerate(texts):
        for name, predictor in in_turns(predictors, i):
            start = time.perf_counter()
            predictor.predict([text])
            times[name].append(time.perf_counter() - start)
    return times


def throughputs(
    predictors: dict[str, Predictor], texts: list[str], repeats: int
) -> dict[str, float]:
    """Sentences per second at batch 64, the variants taking turns batch by batch.

    The texts are cut into the same length-sorted batches of 64 that one ``predict`` call
    over all of them would run; every variant predicts each batch ``repeats`` times in turn,
    and the rate is the sentence count over the sum of each batch's median time (robust to
    a burst of background load during one repeat).
    """
    tokenizer = next(iter(predictors.values())).tokenizer
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    batches = [[texts[i] for i in order[j : j + 64]] for j in range(0, len(order), 64)]
    times: dict[str, list[list[float]]] = {name: [[] for _ in batches] for name in predictors}
    for r in range(repeats):
        for b, batch in enumerate(batches):
            for name, predictor in in_turns(predictors, r + b):
                start = time.perf_counter()
                predictor.predict(batch)
                times[name][b].append(time.perf_counter() - start)
    return {
        name: len(texts) / sum(statistics.median(t) for t in per_batch)
        for name, per_batch in times.items()
    }


def agreement(predictors: dict[str, Predictor], texts: list[str]) -> dict[str, float]:
    """Largest p(positive) difference of merged and ONNX from LoRA unmerged, on all texts."""

    def positive(predictor: Predictor) -> np.ndarray:
        return np.array([p["probs"]["positive"] for p in predictor.predict(texts)])

    ref = positive(predictors["LoRA unmerged"])
    return {
        name: float(np.abs(positive(predictors[name]) - ref).max())
        for name in ("LoRA merged", "ONNX (onnxruntime)")
    }


def run(args: argparse.Namespace) -> None:
    load_before, started = os.getloadavg()[0], time.perf_counter()
    texts = [t[0] for t in read_file(args.data, ["sentence"], "label").texts]
    with tempfile.TemporaryDirectory() as tmp:
        predictors = build(Path(tmp), args.bf16)
        fp32 = {k: v for k, v in predictors.items() if "bf16" not in k}
        # bf16 is emulated on CPUs without AMX/AVX512-BF16: measured on a few sentences only.
        slow = {k: v for k, v in predictors.items() if "bf16" in k}
        diffs = agreement(fp32, texts)
        lat = latencies(fp32, texts[: args.latency_sentences])
        if slow:
            lat |= latencies(slow, texts[: args.bf16_sentences])
        for predictor in predictors.values():
            predictor.batch_size = 64
        tput = throughputs(fp32, texts, args.repeats)
        if slow:
            tput |= throughputs(slow, texts[:64], 1)
    report(lat, tput, diffs, len(texts))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; 1-min load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (the benchmark adds ~2); "
        f"{time.perf_counter() - started:.0f} s in all"
    )


def report(
    lat: dict[str, list[float]],
    tput: dict[str, float],
    diffs: dict[str, float],
    n: int,
) -> None:
    base_lat = statistics.median(lat["bare base model"])
    base_tput = tput["bare base model"]
    print(
        "| variant | batch 1: median ms | batch 1: p90 ms | vs base | batch 64: sentences/s "
        "| vs base | max prob diff vs unmerged |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in lat:
        med = statistics.median(lat[name])
        p90 = float(np.percentile(lat[name], 90))
        tp = tput[name]
        diff = f"{diffs[name]:.1e}" if name in diffs else "-"
        print(
            f"| {name} | {1000 * med:.2f} | {1000 * p90:.2f} | {100 * (med / base_lat - 1):+.1f}% "
            f"| {tp:.1f} | {100 * (tp / base_tput - 1):+.1f}% | {diff} |"
        )
    print(f"\nlatency over {len(lat['bare base model'])} sentences, throughput over {n}", end="")
    slow = [name for name in lat if "bf16" in name]
    print(f"; {slow[0]}: {len(lat[slow[0]])} and 64 (one batch)" if slow else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/sst2/validation.tsv"))
    parser.add_argument("--latency_sentences", type=int, default=872)
    parser.add_argument("--repeats", type=int, default=5, help="timings of each batch of 64")
    parser.add_argument("--bf16", action="store_true", help="add merged + bf16 autocast")
    parser.add_argument("--bf16_sentences", type=int, default=20)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
