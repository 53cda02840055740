"""Prediction speed: bare base model vs LoRA unmerged vs merged vs ONNX, on SST-2 validation.

    .venv/bin/python benchmarks/predict_latency.py --data /work/shared/data/sst2/validation.tsv

MiniLM (the embedded model) with LoRA r=8 on query, key, value, dense and random nonzero
lora_B, so the unmerged branch really computes. Every variant runs the same ``Predictor`` path
(tokenize, length-sorted batches, forward, softmax). Batch-1 latency is taken per sentence
(median and 90th percentile); batch-64 throughput is the median of ``--repeats`` passes over
all sentences. The variants take turns sentence by sentence (and batch by batch), so drifts
in machine speed hit them alike. Run it on an otherwise idle machine: it prints the load.
Prints a markdown table for docs/benchmarks.md.
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
from lorakit.inject import unwrap_lora
from lorakit.merge import export_onnx
from lorakit.models import load_model, load_tokenizer
from lorakit.predict import Predictor

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


def latencies(predictors: dict[str, Predictor], texts: list[str]) -> dict[str, list[float]]:
    """Seconds per single-sentence call, the variants taking turns sentence by sentence.

    Taking turns puts every variant under the same background load (this VM's speed drifts
    by ±20% over minutes), so the differences between variants are theirs.
    """
    for predictor in predictors.values():
        predictor.predict(texts[:10])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for text in texts:
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.predict([text])
            times[name].append(time.perf_counter() - start)
    return times


def throughputs(
    predictors: dict[str, Predictor], texts: list[str], repeats: int
) -> dict[str, list[float]]:
    """Sentences per second at batch 64, the variants taking turns batch by batch.

    The texts are cut into the same length-sorted batches of 64 that one ``predict`` call
    over all of them would run, and each batch is predicted by every variant in turn.
    """
    tokenizer = next(iter(predictors.values())).tokenizer
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    batches = [[texts[i] for i in order[j : j + 64]] for j in range(0, len(order), 64)]
    rates: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(repeats):
        spent = dict.fromkeys(predictors, 0.0)
        for batch in batches:
            for name, predictor in predictors.items():
                start = time.perf_counter()
                predictor.predict(batch)
                spent[name] += time.perf_counter() - start
        for name in predictors:
            rates[name].append(len(texts) / spent[name])
    return rates


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
    load_before = os.getloadavg()[0]
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
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (the benchmark adds ~2)"
    )


def report(
    lat: dict[str, list[float]],
    tput: dict[str, list[float]],
    diffs: dict[str, float],
    n: int,
) -> None:
    base_lat = statistics.median(lat["bare base model"])
    base_tput = statistics.median(tput["bare base model"])
    print(
        "| variant | batch 1: median ms | batch 1: p90 ms | vs base | batch 64: sentences/s "
        "| vs base | max prob diff vs unmerged |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in lat:
        med = statistics.median(lat[name])
        p90 = float(np.percentile(lat[name], 90))
        tp = statistics.median(tput[name])
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
    parser.add_argument("--repeats", type=int, default=3, help="batch-64 passes per variant")
    parser.add_argument("--bf16", action="store_true", help="add merged + bf16 autocast")
    parser.add_argument("--bf16_sentences", type=int, default=20)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
