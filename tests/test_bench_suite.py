"""benchmarks/run.py: medians over rounds, ratios within a round, the docs block it rewrites."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_run"] = bench  # dataclasses look their module up while the class is built
_spec.loader.exec_module(bench)


def _round(peak: float, lorakit: float, tuned: float, merged: float, int8: float) -> dict:
    results: dict = {}
    for v, eps in (("peft_default", tuned / 2), ("peft_tuned", tuned), ("lorakit", lorakit)):
        results[f"train.{v}"] = {"examples_per_sec": eps, "accuracy": 0.8, "peak_rss_mb": 900.0}
        results[f"train.{v}"]["precision"] = "fp32" if v == "peft_default" else "bf16"
    results["train.floor"] = {"examples_per_sec": lorakit * 1.25}
    predict = {"peft_trainer": 100.0, "peft_merged": 200.0, "lorakit": merged}
    predict |= {"onnx_fp32": merged, "onnx_int8": int8, "onnx_int8_all": int8 * 1.5}
    for v, eps in predict.items():
        acc = 0.9 if v != "onnx_int8" else 0.895
        results[f"predict.{v}"] = {"examples_per_sec": eps, "accuracy": acc}
    for kind in ("train", "predict"):
        results[f"shared.{kind}.alone"] = {"rate": 100.0, "threads": 2}
        results[f"shared.{kind}.busy"] = {"rate": 45.0, "threads": 1}
    return {"probe_gflops": peak, "results": results}


def _record() -> dict:
    # The machine doubles its speed in round 2: lorakit and the peer both double, so the
    # within-round ratio stays 2.0 while a ratio of the medians (300 / 100) would say 3.0.
    rounds = [
        _round(100.0, lorakit=200.0, tuned=100.0, merged=400.0, int8=800.0),
        _round(200.0, lorakit=400.0, tuned=200.0, merged=800.0, int8=1000.0),
        _round(100.0, lorakit=300.0, tuned=150.0, merged=400.0, int8=800.0),
    ]
    return {
        "suite": "quick",
        "settings": bench.asdict(bench.SUITES["quick"]),
        "command": "benchmarks/run.py --suite quick",
        "date": "2026-11-30",
        "started": "2026-11-30T10:00:00+00:00",
        "minutes": 12.5,
        "commit": "abc1234",
        "dirty": False,
        "machine": bench.machine(),
        "adapter": "runs/suite/adapter/best",
        "graphs": {"int8_export_seconds": 30.0, "int8_fp32_nodes": 6},
        # 1e8 FLOPs per example: at 100 GFLOP/s the bound is 1,000 examples/s
        "flops": {"train_per_example": 1e8, "predict_per_example": 1e8},
        "rounds": rounds,
    }


def test_summary_takes_ratios_within_rounds_and_medians_over_them() -> None:
    s = bench.summarize(_record())
    assert s["train_vs_tuned"] == bench.Stat(2.0, 2.0, 2.0)
    # fractions of the bound use each round's own probe: 200/1000, 400/2000, 300/1000
    assert s["train_of_bound"].median == pytest.approx(0.2)
    assert s["train_of_bound"].high == pytest.approx(0.3)
    assert s["int8_speedup"].median == pytest.approx(2.0)
    assert s["int8_speedup"].low == pytest.approx(1.25)
    assert s["int8_accuracy_delta"].median == pytest.approx(-0.5)
    assert s["shared_train"].median == pytest.approx(0.45)
    assert s["floor_vs_tuned"].median == pytest.approx(2.5)


def test_render_reports_every_figure_and_which_targets_are_met() -> None:
    text = bench.render(_record())
    assert "Command: `.venv/bin/python benchmarks/run.py --suite quick` (3 rounds" in text
    assert "commit `abc1234`" in text
    for label in [*bench.TRAIN.values(), *bench.PREDICT.values()]:
        assert f"| {label} |" in text
    assert (
        "| lorakit train | bf16 | 300.0 (200.0–400.0) | 2.00x (2.00–2.00) | 20% (20%–30%) |" in text
    )
    assert "| Trainer + PEFT, defaults (random batches) | fp32 |" in text
    assert "| lorakit predict, merged (batch 64, length-sorted) | — |" in text  # not kept then
    targets = {
        line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit(" | ", 1)[1]
        for line in text.splitlines()
        if line.endswith((" yes |", " no |"))
    }
    assert targets["training ≥ 1.8x the tuned Trainer + PEFT"] == "yes"
    assert targets["training ≥ 70% of the fp32 compute bound"] == "no"
    assert targets["int8 ≥ 1.6x lorakit's fp32 merged"] == "yes"
    assert targets["int8 accuracy within 0.3 points of fp32"] == "no"
    assert targets["training beside a busy process ≥ 40% of alone"] == "yes"


def test_update_docs_rewrites_only_the_suite_block(tmp_path: Path) -> None:
    begin, end = bench.markers("quick")
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nintro\n\n{begin}\nold figures\n{end}\n\n## Log\nkept\n")
    bench.update_docs(_record(), docs)
    first = docs.read_text()
    assert "old figures" not in first
    assert first.startswith("# Benchmarks\n\nintro\n\n")
    assert first.endswith(f"{end}\n\n## Log\nkept\n")
    assert "| lorakit train |" in first
    bench.update_docs(_record(), docs)  # idempotent: one block, not two
    assert docs.read_text() == first


def test_update_docs_without_the_markers_is_a_clear_error(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    with pytest.raises(SystemExit, match="suite:quick:begin"):
        bench.update_docs(_record(), docs)
    assert docs.read_text() == "# Benchmarks\n"


def test_machine_record_names_cpu_flags_cores_and_versions() -> None:
    m = bench.machine()
    assert m["cores"] >= 1 and m["cpu"]
    assert set(m["flags"]) <= set(bench.FLAGS)
    assert m["versions"]["torch"]


def test_probe_child_measures_matmul_throughput() -> None:
    out = bench.run_child("probe", {"seconds": 0.05})
    assert out["gflops"] > 0


def test_fewer_than_three_rounds_is_refused() -> None:
    with pytest.raises(SystemExit, match="at least 3"):
        bench.run_suite("quick", str(ROOT.parent / "shared" / "data"), None, 2)
