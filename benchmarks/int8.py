"""int8 prediction against lorakit's fp32 merged model: accuracy and throughput, one run.

    .venv/bin/python benchmarks/int8.py --adapter runs/shipped/best --data_dir ../shared/data

Variants, all over the same adapter and the 872 SST-2 validation sentences in length-sorted
batches of 64 through ``Predictor.predict`` (tokenize, forward, softmax):

- torch fp32 merged (``lorakit predict``'s default; the reference for speed and accuracy),
- ONNX fp32 (``lorakit export``),
- ONNX int8, onnxruntime's defaults (dynamic, one scale per weight tensor: the old export),
- ONNX int8, one scale per output channel, every matmul int8 (``--int8_keep_fp32 0``),
- ONNX int8 as ``lorakit export --quantize int8`` writes it (per channel, the six most
  sensitive matmuls fp32, chosen on rows of the *training* file, never on validation).

Throughput: every variant predicts the whole set ``--repeats`` times, the variants taking
turns (the order rotates each round) so that drifts in machine speed hit them alike; the
median is reported with the spread. The fp32 matmul probe of benchmarks/profile_step.py gives
the compute bound of the torch merged model (FLOPs counted by torch on these batches).
Writes benchmarks/results/int8.json and appends a section to docs/benchmarks-log.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from profile_step import matmul_peak_gflops
from torch.utils.flop_counter import FlopCounterMode
from train_throughput import ROOT, cpu_name, publish

from lorakit.config import DataSettings
from lorakit.data import load_examples
from lorakit.export import export_onnx, onnx_sidecar, onnx_tokenizer_dir
from lorakit.onnx_int8 import quantize_per_channel
from lorakit.predict import Predictor


def _copy_sidecars(src: Path, dst: Path) -> None:
    shutil.copy(onnx_sidecar(src), onnx_sidecar(dst))
    shutil.copytree(onnx_tokenizer_dir(src), onnx_tokenizer_dir(dst), dirs_exist_ok=True)


def _per_tensor(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32, out, weight_type=QuantType.QInt8)


def _accuracy(predictor: Predictor, texts: list[str], labels: np.ndarray) -> float:
    out = predictor.predict(texts)
    return float((np.array([predictor.labels.index(p["label"]) for p in out]) == labels).mean())


def _flops_per_example(predictor: Predictor, texts: list[str]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        predictor.predict(texts)
    return counter.get_total_flops() / len(texts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, required=True, help="an SST-2 adapter on minilm")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_docs", action="store_true")
    args = p.parse_args()
    data = Path(args.data_dir)
    val = load_examples(DataSettings(subset="sst2", data_dir=str(data)), "validation")
    texts, labels = [t[0] for t in val.texts], np.asarray(val.labels)
    calibration = data / "sst2" / "train.tsv"

    predictors: dict[str, Predictor] = {}
    exported: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(args.adapter, fp32)
        variants = {
            "ONNX int8, onnxruntime defaults (per tensor)": lambda o: _per_tensor(fp32, o),
            "ONNX int8, per channel, all matmuls": lambda o: quantize_per_channel(
                fp32, o, None, []
            ),
        }
        predictors["torch fp32 merged (predict default)"] = Predictor.from_adapter(
            args.adapter, merge=True, batch_size=64
        )
        predictors["ONNX fp32"] = Predictor.from_onnx(fp32, batch_size=64)
        for i, (name, make) in enumerate(variants.items()):
            graph = Path(tmp) / f"v{i}.onnx"
            make(graph)
            _copy_sidecars(fp32, graph)
            predictors[name] = Predictor.from_onnx(graph, batch_size=64)
        default = Path(tmp) / "lorakit.onnx"
        tick = time.perf_counter()
        exported = export_onnx(args.adapter, default, quantize="int8", calibration=calibration)
        export_s = time.perf_counter() - tick
        predictors["ONNX int8, lorakit export --quantize int8"] = Predictor.from_onnx(
            default, batch_size=64
        )

        accuracy = {name: _accuracy(pr, texts, labels) for name, pr in predictors.items()}
        rates: dict[str, list[float]] = {name: [] for name in predictors}
        names = list(predictors)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                tick = time.perf_counter()
                predictors[name].predict(texts)
                rates[name].append(len(texts) / (time.perf_counter() - tick))
    reference = next(iter(predictors))
    flops = _flops_per_example(predictors[reference], texts)
    peak = matmul_peak_gflops()
    record = {
        "date": str(datetime.date.today()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "machine": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "adapter": str(args.adapter),
        "fp32_peak_gflops": peak,
        "flops_per_example": flops,
        "export_int8_seconds": export_s,
        "int8_fp32_nodes": exported["int8_fp32_nodes"],
        "variants": {
            n: {"accuracy": accuracy[n], "examples_per_sec": rates[n]} for n in predictors
        },
    }
    out = ROOT / "benchmarks" / "results" / "int8.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    report(record, args)


def report(record: dict, args: argparse.Namespace) -> None:
    variants = record["variants"]
    ref_name = next(iter(variants))
    ref_rate = statistics.median(variants[ref_name]["examples_per_sec"])
    ref_acc = variants[ref_name]["accuracy"]
    bound = record["fp32_peak_gflops"] * 1e9 / record["flops_per_example"]
    lines = [
        f"### int8 prediction vs fp32, {record['date']}",
        "",
        f"Command: `.venv/bin/python benchmarks/int8.py --adapter {args.adapter} "
        f"--data_dir {args.data_dir} --repeats {args.repeats}`  ",
        f"Machine: {record['machine']}, torch {torch.__version__} "
        f"({record['torch_threads']} threads), commit {record['commit']}. fp32 matmul probe: "
        f"{record['fp32_peak_gflops']:.1f} GFLOP/s; the torch model does "
        f"{record['flops_per_example'] / 1e6:.0f} MFLOP per sentence, so its compute bound is "
        f"{bound:.0f} sentences/s.  ",
        f"Data: the 872 SST-2 validation sentences, batches of 64, length-sorted; "
        f"{args.repeats} rounds, variants taking turns. `export --quantize int8` took "
        f"{record['export_int8_seconds']:.0f} s (with its sensitivity pass on train.tsv rows) "
        f"and kept {len(record['int8_fp32_nodes'])} matmuls fp32.",
        "",
        "| variant | sentences/s (median) | min–max | vs torch fp32 | fraction of fp32 bound "
        "| accuracy | vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in variants.items():
        rate = statistics.median(v["examples_per_sec"])
        lines.append(
            f"| {name} | {rate:.1f} | {min(v['examples_per_sec']):.0f}–"
            f"{max(v['examples_per_sec']):.0f} | {rate / ref_rate:.2f}x | {rate / bound:.0%} | "
            f"{100 * v['accuracy']:.2f}% | {100 * (v['accuracy'] - ref_acc):+.2f} pt |"
        )
    publish("\n".join(lines) + "\n", args.no_docs)


if __name__ == "__main__":
    main()
