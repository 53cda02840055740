"""Inference, side by side: a PEFT model evaluated the Trainer way vs lorakit's predictor.

    .venv/bin/python benchmarks/predict_throughput.py --adapter runs/sst2/best

Both load the same adapter (PEFT through ``PeftModel.from_pretrained``, which also shows the
adapter interoperates) over the embedded MiniLM and classify the 872 SST-2 validation
sentences: batched throughput (PEFT: ``Trainer.predict`` with its default eval batch of 8 in
dataset order; lorakit: merged weights, length-sorted batches of 64) and batch-1 latency
(tokenize + forward of one sentence, median over 200); then the same predictor over the graphs
``lorakit export`` writes, fp32 and ``--quantize int8``, through onnxruntime. Prints a
markdown table and appends it to docs/benchmarks-log.md with the command and the date.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lorakit.config import DataSettings
from lorakit.data import load_examples
from lorakit.export import export_onnx
from lorakit.models import load_model, load_tokenizer
from lorakit.predict import Predictor

ROOT = Path(__file__).resolve().parent.parent
LATENCY_SAMPLES = 200


def _timed(fn, repeat: int = 1) -> float:  # noqa: ANN001
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def peft_model(adapter: Path):  # noqa: ANN201
    """The embedded MiniLM with ``adapter`` loaded by PEFT, and its tokenizer."""
    from peft import PeftModel

    base = load_model("minilm", {0: "negative", 1: "positive"})
    return PeftModel.from_pretrained(base, str(adapter)).eval(), load_tokenizer("minilm")


def trainer_predict(model, tokenizer, texts: list[str]):  # noqa: ANN001, ANN201
    """``texts``' logits the way a Trainer user gets them: ``Trainer.predict`` with its
    defaults (eval batch 8, dataset order), as a no-argument callable."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    ds = Dataset.from_dict({**tokenizer(texts, truncation=True, max_length=128)})
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(ROOT / "runs" / "bench"), report_to=[], use_cpu=True),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    return lambda: np.asarray(trainer.predict(ds).predictions)


def peft_side(adapter: Path, texts: list[str], labels: np.ndarray) -> dict:
    model, tokenizer = peft_model(adapter)
    predict = trainer_predict(model, tokenizer, texts)
    preds: list[np.ndarray] = []
    seconds = _timed(lambda: preds.append(predict()))
    one = []
    with torch.inference_mode():
        for text in texts[:LATENCY_SAMPLES]:
            start = time.perf_counter()
            model(**tokenizer(text, return_tensors="pt")).logits.argmax(-1)
            one.append(time.perf_counter() - start)
    accuracy = float((preds[-1].argmax(-1) == labels).mean())
    return {
        "examples_per_sec": len(texts) / seconds,
        "latency_ms": 1e3 * statistics.median(one),
        "accuracy": accuracy,
    }


def lorakit_side(predictor: Predictor, texts: list[str], labels: np.ndarray) -> dict:
    out: list[list] = []
    seconds = _timed(lambda: out.append(predictor.predict(texts)))
    names = predictor.labels
    accuracy = float((np.array([names.index(p["label"]) for p in out[-1]]) == labels).mean())
    one = []
    for text in texts[:LATENCY_SAMPLES]:
        start = time.perf_counter()
        predictor.predict([text])
        one.append(time.perf_counter() - start)
    return {
        "examples_per_sec": len(texts) / seconds,
        "latency_ms": 1e3 * statistics.median(one),
        "accuracy": accuracy,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, required=True, help="an SST-2 adapter on minilm")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--no_onnx", action="store_true", help="skip the exported fp32/int8 graphs")
    p.add_argument("--no_docs", action="store_true")
    args = p.parse_args()
    ex = load_examples(DataSettings(subset="sst2", data_dir=args.data_dir), "validation")
    texts, labels = [t[0] for t in ex.texts], np.asarray(ex.labels)

    rows = {
        "PEFT model, Trainer.predict (eval batch 8, dataset order)": peft_side(
            args.adapter, texts, labels
        )
    }
    for merge in (False, True):
        predictor = Predictor.from_adapter(args.adapter, merge=merge, batch_size=64)
        name = f"lorakit predict, {'merged' if merge else 'unmerged'} (batch 64, length-sorted)"
        rows[name] = lorakit_side(predictor, texts, labels)
    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as tmp:
            for quantize in ("none", "int8"):
                graph = Path(tmp) / f"{quantize}.onnx"
                export_onnx(args.adapter, graph, quantize=quantize)  # type: ignore[arg-type]
                kind = "int8" if quantize == "int8" else "fp32"
                name = f"lorakit predict --onnx, {kind} (export --quantize {quantize}, batch 64)"
                rows[name] = lorakit_side(Predictor.from_onnx(graph, batch_size=64), texts, labels)
    report(rows, args)


def report(rows: dict[str, dict], args: argparse.Namespace) -> None:
    from train_throughput import cpu_name, publish

    base = next(iter(rows.values()))
    cmd = f".venv/bin/python benchmarks/predict_throughput.py --adapter {args.adapter}"
    if args.no_onnx:
        cmd += " --no_onnx"
    lines = [
        f"### Inference vs PEFT, {datetime.date.today()}",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {cpu_name()}, fp32, torch {torch.__version__}.  ",
        f"Data: the 872 SST-2 validation sentences; latency is the median of {LATENCY_SAMPLES} "
        "single-sentence calls (tokenize + forward).",
        "",
        "| path | examples/s | vs PEFT | batch-1 latency ms | accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['examples_per_sec']:.1f} | "
            f"{r['examples_per_sec'] / base['examples_per_sec']:.2f}x | "
            f"{r['latency_ms']:.2f} | {r['accuracy']:.4f} |"
        )
    publish("\n".join(lines) + "\n", args.no_docs)


if __name__ == "__main__":
    main()
