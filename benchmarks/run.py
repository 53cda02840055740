"""Every speed comparison of docs/benchmarks.md in one command, repeated, machine and commit kept.

    .venv/bin/python benchmarks/run.py --suite quick          # ~20 min on 2 cores
    .venv/bin/python benchmarks/run.py --suite full --adapter runs/shipped/best
    .venv/bin/python benchmarks/run.py --render               # the docs tables from saved runs

A suite runs ``rounds`` rounds (3 or more). A round measures the fp32 matmul probe of
benchmarks/profile_step.py (the compute bound) and then every benchmark, each in a fresh
process, in an order that rotates from round to round, so that drifts in machine speed hit all
of them alike. Ratios (lorakit against a peer, beside a busy process against alone) are taken
within a round; the tables give the median over rounds and the min–max.

- Training: Trainer + PEFT with its defaults and tuned (length-grouped batches, bf16 only
  where this CPU has it natively), and ``lorakit train``, the same LoRA recipe
  (configs/sst2_minilm.yaml) on the same first SST-2 training rows, full sentence lengths.
- Prediction over the 872 SST-2 validation sentences with one adapter: PEFT's
  ``Trainer.predict`` as users call it, PEFT ``merge_and_unload`` at lorakit's batch size with
  length-sorted batches, lorakit's merged model, and its ONNX fp32 and int8 graphs.
- Shared machine: training steps and prediction alone and beside a busy process.

FLOPs per example are counted by torch on lorakit's own batches, so every speed also reads as
a fraction of the bound (probe GFLOP/s / FLOPs per example). The record (machine, versions,
commit, date, every sample) goes to benchmarks/results/suite/<suite>-<date>-<commit>.json,
and docs/benchmarks.md's block for that suite is rewritten from the newest record.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "suite"
DOCS = ROOT / "docs" / "benchmarks.md"
CONFIG = ROOT / "configs" / "sst2_minilm.yaml"
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
PACKAGES = ("torch", "transformers", "peft", "onnxruntime", "datasets")


@dataclass(frozen=True)
class Suite:
    rounds: int
    train_rows: int  # first SST-2 training rows each training benchmark trains on
    predict_passes: int  # timed passes over the validation set per prediction benchmark
    shared_steps: int  # training steps per shared-machine measurement
    shared_rounds: int  # passes over the validation set per shared-machine measurement
    torch_competitor: bool  # also measure beside another torch job
    adapter_rows: int  # rows the suite's own adapter trains on when --adapter is not given


SUITES = {
    "quick": Suite(3, 2048, 3, 30, 2, False, 8000),
    "full": Suite(5, 4096, 5, 60, 3, True, 8000),
}

TRAIN = {
    "peft_default": "Trainer + PEFT, defaults (random batches)",
    "peft_tuned": "Trainer + PEFT, tuned (group_by_length, bf16 only where native)",
    "lorakit": "lorakit train",
}
FLOOR = "floor: the same step with no LoRA, gradients still to the embeddings (not a trainer)"
PREDICT = {
    "peft_trainer": "PEFT, `Trainer.predict` (eval batch 8, dataset order)",
    "peft_merged": "PEFT `merge_and_unload`, batch 64, length-sorted",
    "lorakit": "lorakit predict, merged (batch 64, length-sorted)",
    "onnx_fp32": "lorakit predict --onnx, fp32",
    "onnx_int8": "lorakit predict --onnx, int8 (`export --quantize int8`)",
    "onnx_int8_all": "the same, every matmul int8 (`--int8_keep_fp32 0`)",
}


# ---------------------------------------------------------------- children (fresh processes)


def child_probe(spec: dict) -> dict:
    from profile_step import matmul_peak_gflops

    return {"gflops": matmul_peak_gflops(spec.get("seconds", 2.0))}


def child_flops(spec: dict) -> dict:
    """FLOPs per example of lorakit's training step on its own batches of the timed rows, and
    of the merged model's prediction batches (sorted, 64) over the validation split."""
    from profile_step import flops_of, recipe
    from train_throughput import HYPER

    from lorakit.data import eval_order

    # the rank the training rows are timed at (train_throughput.HYPER), not the config's
    overrides = {"training.max_train_samples": spec["train_rows"], "lora.rank": HYPER["rank"]}
    r = recipe(str(CONFIG), spec["data_dir"], overrides)
    train = flops_of(r.train_step, r.order) / sum(len(b) for b in r.order)
    r.merge_for_prediction()
    batches = eval_order(r.eval_data.lengths, 64)
    predict = flops_of(r.predict_step, batches) / len(r.eval_data)
    return {"train_per_example": train, "predict_per_example": predict}


def child_train(spec: dict) -> dict:
    from train_throughput import run_lorakit, run_trainer

    out = ROOT / "runs" / "bench" / spec["variant"]
    if spec["variant"] == "lorakit":
        return run_lorakit(spec["data_dir"], spec["train_rows"], out)
    return run_trainer(spec["data_dir"], spec["train_rows"], out, spec["variant"] == "peft_tuned")


def child_floor(spec: dict) -> dict:
    """The floor under any LoRA trainer in eager PyTorch: the same model, batches and dropout
    with no LoRA at all, but gradients flowing down to the embeddings (only their LayerNorm and
    the head train), so backward still computes every frozen input gradient. Steady examples/s
    after 5 steps, the way ``lorakit train`` counts them."""
    from profile_step import recipe

    def grads_to_the_bottom(model: Any) -> None:
        model.base_model.embeddings.LayerNorm.requires_grad_(True)

    overrides = {"training.max_train_samples": spec["train_rows"], "method": "head"}
    r = recipe(str(CONFIG), spec["data_dir"], overrides, grads_to_the_bottom)
    for idx in r.order[:5]:
        r.train_step(idx)
    tick = time.perf_counter()
    for idx in r.order[5:]:
        r.train_step(idx)
    return {"examples_per_sec": sum(len(b) for b in r.order[5:]) / (time.perf_counter() - tick)}


def _predict_fn(spec: dict, texts: list[str]) -> Any:
    """A callable returning the predicted label ids of ``texts`` the benchmark's way."""
    import numpy as np
    import torch

    from lorakit.predict import Predictor
    from lorakit.runtime import autocast

    variant, adapter = spec["variant"], spec["adapter"]
    if variant.startswith("peft"):
        from predict_throughput import peft_model, trainer_predict

        model, tokenizer = peft_model(Path(adapter))
    if variant == "peft_trainer":
        predict = trainer_predict(model, tokenizer, texts)
        return lambda: predict().argmax(-1)
    if variant == "peft_merged":
        merged = model.merge_and_unload().eval()
        amp = _auto_predict_dtype()  # the precision lorakit's predict runs here, for both
        ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
        order = np.argsort([len(i) for i in ids], kind="stable")

        def run() -> np.ndarray:
            out = np.empty(len(texts), dtype=np.int64)
            with torch.inference_mode(), autocast(torch.device("cpu"), amp):
                for start in range(0, len(texts), 64):
                    idx = order[start : start + 64]
                    enc = tokenizer(
                        [texts[i] for i in idx],
                        padding=True,
                        truncation=True,
                        max_length=128,
                        return_tensors="pt",
                    )
                    out[idx] = merged(**enc).logits.argmax(-1).numpy()
            return out

        return run
    if variant == "lorakit":
        predictor = Predictor.from_adapter(Path(adapter), merge=True, batch_size=64)
    else:
        predictor = Predictor.from_onnx(Path(spec["graph"]), batch_size=64)
    names = predictor.labels
    return lambda: np.array([names.index(p["label"]) for p in predictor.predict(texts)])


def _auto_predict_dtype() -> Any:
    import torch

    from lorakit.runtime import amp_dtype

    return amp_dtype("auto", torch.device("cpu"), "predict")


def _predict_precision(spec: dict) -> str:
    """What precision a prediction benchmark ran: the graph's for ONNX, fp32 for the
    Trainer (its default, as users call it), else what ``--precision auto`` picks here."""
    from lorakit.runtime import precision_name

    if spec["variant"].startswith("onnx"):
        return "int8" if "int8" in spec["variant"] else "fp32"
    if spec["variant"] == "peft_trainer":
        return "fp32"
    return precision_name(_auto_predict_dtype())


def child_predict(spec: dict) -> dict:
    import numpy as np

    from lorakit.config import DataSettings
    from lorakit.data import load_examples

    ex = load_examples(DataSettings(subset="sst2", data_dir=spec["data_dir"]), "validation")
    texts, labels = [t[0] for t in ex.texts], np.asarray(ex.labels)
    fn = _predict_fn(spec, texts)
    accuracy = float((fn() == labels).mean())  # also the warm-up pass
    rates = []
    for _ in range(spec["passes"]):
        tick = time.perf_counter()
        fn()
        rates.append(len(texts) / (time.perf_counter() - tick))
    return {
        "examples_per_sec": statistics.median(rates),
        "passes": rates,
        "accuracy": accuracy,
        "precision": _predict_precision(spec),
    }


CHILDREN = {
    "probe": child_probe,
    "flops": child_flops,
    "train": child_train,
    "floor": child_floor,
    "predict": child_predict,
}


def run_child(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"benchmark {kind} {spec.get('variant', '')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------- the parent: setup and rounds


def machine() -> dict:
    flags: set[str] = set()
    name = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": name,
        "flags": [f for f in FLAGS if f in flags],
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "versions": versions,
    }


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def suite_adapter(data_dir: str, rows: int) -> Path:
    """The suite's own adapter: the shipped recipe on the first ``rows`` training rows, 1 epoch;
    kept in runs/suite/ and reused while the recipe is unchanged."""
    out = ROOT / "runs" / "suite" / "adapter"
    stamp = {"config": CONFIG.read_text(), "rows": rows, "data_dir": data_dir}
    stamp_file = out / "suite_stamp.json"
    fresh = (out / "best").is_dir() and stamp_file.is_file()
    if fresh and json.loads(stamp_file.read_text()) == stamp:
        return out / "best"
    lorakit = [sys.executable, "-m", "lorakit", "train", "--config", str(CONFIG)]
    args = ["--data_dir", data_dir, "--max_train_samples", str(rows), "--num_epochs", "1"]
    args += ["--output_dir", str(out), "--overwrite"]
    print(f"training the suite's adapter: {rows} rows, 1 epoch -> {out}", flush=True)
    subprocess.run([*lorakit, *args], check=True, stdout=subprocess.DEVNULL)
    stamp_file.write_text(json.dumps(stamp))
    return out / "best"


def export_graphs(adapter: Path, data_dir: str) -> dict:
    from lorakit.export import export_onnx

    folder = ROOT / "runs" / "suite" / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    fp32, int8, int8_all = folder / "fp32.onnx", folder / "int8.onnx", folder / "int8_all.onnx"
    export_onnx(adapter, fp32, overwrite=True)
    export_onnx(adapter, int8_all, overwrite=True, quantize="int8", keep_fp32=0)
    calibration = Path(data_dir) / "sst2" / "train.tsv"
    tick = time.perf_counter()
    info = export_onnx(adapter, int8, overwrite=True, quantize="int8", calibration=calibration)
    return {
        "paths": {"fp32": str(fp32), "int8": str(int8), "int8_all": str(int8_all)},
        "int8_export_seconds": time.perf_counter() - tick,
        "int8_fp32_nodes": len(info["int8_fp32_nodes"]),
    }


def shared(kind: str, steps: int, data_dir: str, competitor: str | None) -> dict:
    from shared_cpu import measure

    return measure(kind, steps, data_dir, {}, competitor)


def competitors(with_torch: bool) -> dict[str, str | None]:
    """shared_cpu.py's competitors, by short name."""
    from shared_cpu import COMPETITORS

    names = {"alone": "alone", "busy": "a busy process (1 core)"}
    if with_torch:
        names["torch"] = "another torch job (2 threads)"
    return {short: COMPETITORS[long] for short, long in names.items()}


def benchmarks(suite: Suite, data_dir: str, adapter: Path, graphs: dict) -> dict[str, Any]:
    """Name -> a no-argument function measuring it in fresh processes."""
    jobs: dict[str, Any] = {}
    for v in TRAIN:
        spec = {"variant": v, "data_dir": data_dir, "train_rows": suite.train_rows}
        jobs[f"train.{v}"] = lambda s=spec: run_child("train", s)
    spec = {"data_dir": data_dir, "train_rows": suite.train_rows}
    jobs["train.floor"] = lambda s=spec: run_child("floor", s)
    for v in PREDICT:
        spec = {"variant": v, "data_dir": data_dir, "adapter": str(adapter)}
        spec |= {
            "passes": suite.predict_passes,
            "graph": graphs["paths"].get(v.removeprefix("onnx_")),
        }
        jobs[f"predict.{v}"] = lambda s=spec: run_child("predict", s)
    for kind, steps in (("train", suite.shared_steps), ("predict", suite.shared_rounds)):
        for cname, comp in competitors(suite.torch_competitor).items():
            jobs[f"shared.{kind}.{cname}"] = lambda k=kind, n=steps, c=comp: shared(
                k, n, data_dir, c
            )
    return jobs


def run_suite(name: str, data_dir: str, adapter: Path | None, rounds: int | None) -> Path:
    suite = SUITES[name]
    n_rounds = rounds or suite.rounds
    if n_rounds < 3:
        sys.exit("benchmarks/run.py: --rounds must be at least 3 (a median of fewer is no median)")
    started = datetime.datetime.now(datetime.UTC)
    commit = git("rev-parse", "--short", "HEAD")  # the code measured, before anything moves
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    if adapter is None:
        adapter = suite_adapter(data_dir, suite.adapter_rows)
    graphs = export_graphs(adapter, data_dir)
    print(f"graphs exported ({graphs['int8_export_seconds']:.0f} s for int8)", flush=True)
    flops = run_child("flops", {"data_dir": data_dir, "train_rows": suite.train_rows})
    jobs = benchmarks(suite, data_dir, adapter, graphs)
    names = list(jobs)
    samples: list[dict] = []
    for r in range(n_rounds):
        round_ = {"probe_gflops": run_child("probe", {})["gflops"], "results": {}}
        for bench in names[r % len(names) :] + names[: r % len(names)]:
            tick = time.perf_counter()
            round_["results"][bench] = jobs[bench]()
            print(
                f"round {r + 1}/{n_rounds} {bench}: {round_['results'][bench]} "
                f"({time.perf_counter() - tick:.0f} s)",
                flush=True,
            )
        samples.append(round_)
    record = {
        "suite": name,
        "settings": asdict(suite) | {"rounds": n_rounds},
        "command": " ".join(["benchmarks/run.py", *sys.argv[1:]]),
        "date": str(started.date()),
        "started": started.isoformat(timespec="seconds"),
        "minutes": round((datetime.datetime.now(datetime.UTC) - started).total_seconds() / 60, 1),
        "commit": commit,
        "dirty": dirty,
        "machine": machine(),
        "adapter": str(adapter),
        "graphs": {k: v for k, v in graphs.items() if k != "paths"},
        "flops": flops,
        "rounds": samples,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}-{record['date']}-{commit}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


# ---------------------------------------------------------------- summary and docs


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values))

    def fmt(self, spec: str = ".1f", unit: str = "") -> str:
        return f"{self.median:{spec}}{unit} ({self.low:{spec}}–{self.high:{spec}})"


def per_round(record: dict, fn: Any) -> Stat:
    """A figure computed inside each round (so a ratio sees one machine state), over rounds."""
    return Stat.of([fn(r["results"], r["probe_gflops"]) for r in record["rounds"]])


def ratio(bench: str, base: str, key: str = "examples_per_sec") -> Any:
    return lambda res, _peak: res[bench][key] / res[base][key]


def of_bound(bench: str, flops: float) -> Any:
    return lambda res, peak: res[bench]["examples_per_sec"] * flops / (peak * 1e9)


def summarize(record: dict) -> dict[str, Stat]:
    """The figures the targets read, by name."""
    f = record["flops"]
    out = {
        "probe_gflops": per_round(record, lambda _res, peak: peak),
        "train_of_bound": per_round(record, of_bound("train.lorakit", f["train_per_example"])),
        "train_vs_tuned": per_round(record, ratio("train.lorakit", "train.peft_tuned")),
        "floor_vs_tuned": per_round(record, ratio("train.floor", "train.peft_tuned")),
        "lorakit_vs_floor": per_round(record, ratio("train.lorakit", "train.floor")),
        "peft_merged_vs_lorakit": per_round(
            record, ratio("predict.peft_merged", "predict.lorakit")
        ),
        "floor_of_bound": per_round(record, of_bound("train.floor", f["train_per_example"])),
        "predict_of_bound": per_round(
            record, of_bound("predict.lorakit", f["predict_per_example"])
        ),
        "int8_speedup": per_round(record, ratio("predict.onnx_int8", "predict.lorakit")),
        "int8_accuracy_delta": per_round(
            record,
            lambda res, _p: (
                100 * (res["predict.onnx_int8"]["accuracy"] - res["predict.lorakit"]["accuracy"])
            ),
        ),
    }
    for kind in ("train", "predict"):
        out[f"shared_{kind}"] = per_round(
            record, ratio(f"shared.{kind}.busy", f"shared.{kind}.alone", "rate")
        )
    return out


TARGETS = [  # figure, what issue #12 asks, test, how to print it
    ("train_of_bound", "training ≥ 70% of the fp32 compute bound", lambda s: s >= 0.70, ".0%"),
    ("train_vs_tuned", "training ≥ 1.8x the tuned Trainer + PEFT", lambda s: s >= 1.8, ".2f"),
    ("predict_of_bound", "merged prediction ≥ 90% of the bound", lambda s: s >= 0.90, ".0%"),
    ("int8_speedup", "int8 ≥ 1.6x lorakit's fp32 merged", lambda s: s >= 1.6, ".2f"),
    (
        "int8_accuracy_delta",
        "int8 accuracy within 0.3 points of fp32",
        lambda s: s >= -0.3,
        "+.2f",
    ),
    ("shared_train", "training beside a busy process ≥ 40% of alone", lambda s: s >= 0.4, ".0%"),
    (
        "shared_predict",
        "prediction beside a busy process ≥ 40% of alone",
        lambda s: s >= 0.4,
        ".0%",
    ),
]


def limits(s: dict[str, Stat]) -> dict[str, str]:
    """What limits each figure now: the reasoning is kept by hand, the figures are this run's."""
    return {
        "train": (
            "the floor row is the same model on the same batches with no LoRA at all, timed in "
            "a bare loop, its backward still computing every frozen input gradient: "
            f"{s['floor_of_bound'].median:.0%} of the bound and "
            f"{s['floor_vs_tuned'].median:.2f}x the tuned peer. A LoRA layer, however fast, "
            "only adds to that step, so no LoRA trainer in eager PyTorch can pass the floor "
            f"here (lorakit runs at {s['lorakit_vs_floor'].median:.0%} of it). What holds "
            "the floor down: dropout on the hidden states and attention probabilities (the "
            "step ran 1.34x faster with none in the paired A/B of benchmarks/train_step_ab.py), "
            "the attention's per-head products over sequences of ~16 tokens, and eager "
            "PyTorch's separate LayerNorm, GELU, softmax and add kernels. "
            "torch.compile did not pay (benchmarks/train_compile_ab.py; "
            "[benchmarks-log.md](benchmarks-log.md))."
        ),
        "predict": (
            "PEFT's merged model on the same sorted batches runs at "
            f"{s['peft_merged_vs_lorakit'].median:.2f}x lorakit's: at inference both are the "
            "same eager BERT forward, and that forward reaches "
            f"{s['predict_of_bound'].median:.0%} of the bound. Tokenising is inside the timed "
            "path, and the attention's per-head products, softmax, LayerNorm and GELU run as "
            "separate kernels. The int8 graph keeps the most sensitive matmuls fp32 (the "
            "feed-forward ones, which carry most of the FLOPs) to hold accuracy; all-int8 is "
            "faster and less accurate (benchmarks/int8.py, [benchmarks-log.md](benchmarks-log.md))."
        ),
        "shared": (
            "beside a busy process the thread governor drops to the cores left free, so the "
            "figure is what one core gives against two alone."
        ),
    }


def render(record: dict) -> str:
    """The markdown block of one suite run."""
    m, f, s = record["machine"], record["flops"], summarize(record)
    why = limits(s)
    res = record["rounds"]
    n = len(res)
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)

    def med(bench: str, key: str = "examples_per_sec") -> Stat:
        return Stat.of([r["results"][bench][key] for r in res])

    def precision(bench: str) -> str:  # "—" for records from before it was kept
        return "/".join(sorted({r["results"][bench].get("precision", "—") for r in res}))

    lines = [
        f"Command: `.venv/bin/python {record['command']}` ({n} rounds, {record['minutes']} min)  ",
        f"Date: {record['date']}, commit `{record['commit']}`"
        + (" (with uncommitted changes)" if record["dirty"] else "")
        + "  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, flags "
        f"{' '.join(m['flags']) or 'none of ' + ' '.join(FLAGS)}; Python {m['python']}, "
        f"{versions}.  ",
        f"fp32 matmul probe: {s['probe_gflops'].fmt()} GFLOP/s. FLOPs per example (counted by "
        f"torch on lorakit's batches): training {f['train_per_example'] / 1e6:.0f} M, "
        f"prediction {f['predict_per_example'] / 1e6:.0f} M.  ",
        "Every figure: median over rounds (min–max); ratios are taken within each round.",
        "",
        f"**Training**, {record['settings']['train_rows']} SST-2 training rows, "
        "the same recipe for both sides (LoRA r=8, alpha 8, query/key/value/dense, batch 32, "
        "lr 1e-3, fp32 unless said; configs/sst2_minilm.yaml at the rank the speed figures have "
        "always used, the config ships r=32), steady examples/s after 5 steps. The accuracy "
        "after so few rows only shows that each side trains; docs/results.md has the real "
        "ones:",
        "",
        "| variant | precision | examples/s | vs tuned peer | fraction of bound | val. accuracy "
        "| peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for v, label in TRAIN.items():
        b = f"train.{v}"
        lines.append(
            f"| {label} | {precision(b)} | {med(b).fmt()} | "
            f"{per_round(record, ratio(b, 'train.peft_tuned')).fmt('.2f', 'x')} | "
            f"{per_round(record, of_bound(b, f['train_per_example'])).fmt('.0%')} | "
            f"{100 * med(b, 'accuracy').median:.2f}% | {med(b, 'peak_rss_mb').median:.0f} |"
        )
    b = "train.floor"
    lines.append(
        f"| {FLOOR} | fp32 | {med(b).fmt()} | "
        f"{per_round(record, ratio(b, 'train.peft_tuned')).fmt('.2f', 'x')} | "
        f"{per_round(record, of_bound(b, f['train_per_example'])).fmt('.0%')} | — | — |"
    )
    lines += ["", f"What limits it: {why['train']}", ""]
    lines += [
        f"**Prediction**, the 872 SST-2 validation sentences, adapter `{record['adapter']}`; "
        f"sentences/s over {record['settings']['predict_passes']} passes per process. The int8 "
        f"graph keeps {record['graphs']['int8_fp32_nodes']} matmuls fp32 (export took "
        f"{record['graphs']['int8_export_seconds']:.0f} s):",
        "",
        "| path | precision | sentences/s | vs PEFT Trainer.predict | vs PEFT merged "
        "| fraction of fp32 bound | accuracy | vs lorakit |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v, label in PREDICT.items():
        b = f"predict.{v}"
        if b not in res[0]["results"]:  # a record from before the variant was added
            continue
        acc = med(b, "accuracy").median
        delta = 100 * (acc - med("predict.lorakit", "accuracy").median)
        lines.append(
            f"| {label} | {precision(b)} | {med(b).fmt()} | "
            f"{per_round(record, ratio(b, 'predict.peft_trainer')).fmt('.2f', 'x')} | "
            f"{per_round(record, ratio(b, 'predict.peft_merged')).fmt('.2f', 'x')} | "
            f"{per_round(record, of_bound(b, f['predict_per_example'])).fmt('.0%')} | "
            f"{100 * acc:.2f}% | {delta:+.2f} pt |"
        )
    lines += ["", f"What limits it: {why['predict']}", ""]
    comps = [c for c in ("busy", "torch") if f"shared.train.{c}" in res[0]["results"]]
    header = {"busy": "beside a busy process", "torch": "beside another torch job"}
    lines += [
        f"**Shared machine**: {record['settings']['shared_steps']} training steps, or "
        f"{record['settings']['shared_rounds']} passes of merged prediction, in a fresh process "
        "alone and beside a competitor; lorakit's default thread policy.",
        "",
        "| job | alone | " + " | ".join(f"{header[c]} | shared / alone" for c in comps) + " |",
        "|---|---:|" + "---:|---:|" * len(comps),
    ]
    for kind in ("train", "predict"):
        row = f"| {kind} | {med(f'shared.{kind}.alone', 'rate').fmt()} |"
        for c in comps:
            share = per_round(record, ratio(f"shared.{kind}.{c}", f"shared.{kind}.alone", "rate"))
            row += f" {med(f'shared.{kind}.{c}', 'rate').fmt()} | {share.fmt('.0%')} |"
        lines.append(row)
    lines += ["", f"What limits it: {why['shared']}", ""]
    lines += [
        "**Issue #12's targets** (medians):",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    for key, text, ok, spec in TARGETS:
        lines.append(f"| {text} | {s[key].fmt(spec)} | {'yes' if ok(s[key].median) else 'no'} |")
    return "\n".join(lines) + "\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- suite:{name}:begin -->", f"<!-- suite:{name}:end -->"


def update_docs(record: dict, docs: Path = DOCS) -> None:
    """Rewrite the suite's block of docs/benchmarks.md; the rest of the file is kept."""
    begin, end = markers(record["suite"])
    text = docs.read_text()
    if begin not in text or end not in text:
        sys.exit(f"{docs}: no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(f"{head}{begin}\n{render(record)}{end}{tail}")


def newest(name: str) -> dict | None:
    files = sorted(
        RESULTS.glob(f"{name}-*.json"), key=lambda p: json.loads(p.read_text())["started"]
    )
    return json.loads(files[-1].read_text()) if files else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=list(SUITES))
    p.add_argument("--render", action="store_true", help="only rewrite the docs from saved runs")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--adapter", type=Path, help="an SST-2 adapter on minilm (default: train one)")
    p.add_argument("--rounds", type=int, help="override the suite's round count (>= 3)")
    p.add_argument("--no_docs", action="store_true", help="save the record, leave the docs")
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(CHILDREN[args.child](json.loads(args.spec))), flush=True)
        return
    if args.suite:
        out = run_suite(args.suite, args.data_dir, args.adapter, args.rounds)
        print(f"saved {out.relative_to(ROOT)}")
        record = json.loads(out.read_text())
        print(render(record))
        if not args.no_docs:
            update_docs(record)
    elif args.render:
        for name in SUITES:
            record = newest(name)
            if record is not None:
                update_docs(record)
    else:
        p.error("give --suite NAME or --render")


if __name__ == "__main__":
    main()
