"""``lorakit sweep``: grid parsing, planning, tables, and a real tiny sweep killed and rerun."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_tiny_model_dir, write_sentiment_rows

from lorakit.cli import main
from lorakit.errors import LoraKitError
from lorakit.sweep import Axis, Sweep, parse_grid, parse_seeds, plan_runs, std, summarize


def test_parse_grid_reads_yaml_values_lists_and_flag_names() -> None:
    assert parse_grid("lora.rank=4,8,16") == Axis("lora.rank", (4, 8, 16))
    assert parse_grid("lora_r=4") == Axis("lora.rank", (4,))  # an alias
    assert parse_grid("learning_rate=5e-4,1e-3") == Axis("training.learning_rate", (5e-4, 1e-3))
    lists = parse_grid("target_modules=[query,value],[query,key,value,dense]")
    assert lists.values == (["query", "value"], ["query", "key", "value", "dense"])
    mixed = parse_grid("target_modules=all-linear;[query,value]")
    assert mixed.values == ("all-linear", ["query", "value"])
    assert parse_grid("method=head,full,lora").key == "method"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rank", "expected KEY=V1,V2"),
        ("rank=", "expected KEY=V1,V2"),
        ("rank=4,,8", "an empty value"),
        ("no_such_key=1", "unknown config key 'no_such_key'"),
        ("rank=[4", "cannot read the value"),
    ],
)
def test_parse_grid_refuses_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(LoraKitError, match=message.replace("[", r"\[")):
        parse_grid(spec)


def test_parse_seeds() -> None:
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("a", "1,1", ""):
        with pytest.raises(LoraKitError, match="--seeds"):
            parse_seeds(bad)


def test_plan_is_every_combination_times_every_seed() -> None:
    axes = [
        Axis("lora.rank", (4, 8)),
        Axis("lora.target_modules", (["query", "value"], "all-linear")),
    ]
    runs = plan_runs(axes, [0, 1])
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0].name == "rank=4,target_modules=query+value,seed=0"
    assert runs[0].values == {
        "lora.rank": 4,
        "lora.target_modules": ["query", "value"],
        "training.seed": 0,
    }
    assert {r.point for r in runs} == {
        "rank=4,target_modules=query+value",
        "rank=4,target_modules=all-linear",
        "rank=8,target_modules=query+value",
        "rank=8,target_modules=all-linear",
    }
    with pytest.raises(LoraKitError, match="swept twice"):
        plan_runs([Axis("lora.rank", (4,)), Axis("lora.rank", (8,))], [0])
    with pytest.raises(LoraKitError, match="--seeds"):
        plan_runs([Axis("training.seed", (1, 2))], [0])


def test_bad_values_fail_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(LoraKitError, match=r"run rank=0,seed=0: lora.rank must be positive"):
        Sweep(None, [Axis("lora.rank", (4, 0))], [0], {}, out)
    with pytest.raises(LoraKitError, match="sets training.output_dir itself"):
        Sweep(None, [], [0], {"training.output_dir": "x"}, out)
    with pytest.raises(LoraKitError, match="push_to_hub"):
        Sweep(None, [], [0], {"training.push_to_hub": True}, out)
    with pytest.raises(LoraKitError, match="sweeps lora.rank, which a flag also sets"):
        Sweep(None, [Axis("lora.rank", (4, 8))], [0], {"lora.rank": 8}, out)
    assert not out.exists()


def test_more_seeds_or_grid_values_extend_a_sweep_and_keep_its_finished_runs(
    tmp_path: Path,
) -> None:
    out = tmp_path / "sweep"
    Sweep(None, [Axis("lora.rank", (2,))], [0], {"training.dev_split": 32}, out).prepare()
    finished = out / "runs" / "rank=2,seed=0"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text(json.dumps({"best_eval": {"accuracy": 0.5}}))
    wider = Sweep(None, [Axis("lora.rank", (2, 4))], [0, 1], {"training.dev_split": 32}, out)
    wider.prepare()
    assert [(r.name, r.status) for r in wider.runs] == [
        ("rank=2,seed=0", "done"),
        ("rank=2,seed=1", "left"),
        ("rank=4,seed=0", "left"),
        ("rank=4,seed=1", "left"),
    ]
    plan = json.loads((out / "sweep.json").read_text())
    assert plan["seeds"] == [0, 1] and plan["grid"] == {"lora.rank": [2, 4]}
    assert (out / "configs" / "rank=4,seed=1.yaml").is_file()
    # Dropping a seed or a value, adding an axis or changing a fixed flag is another sweep;
    # the refused command leaves the saved plan as it was.
    for axes, seeds, overrides in [
        ([Axis("lora.rank", (2, 4))], [1], {"training.dev_split": 32}),
        ([Axis("lora.rank", (4,))], [0, 1], {"training.dev_split": 32}),
        ([Axis("lora.rank", (2, 4)), Axis("lora.alpha", (8,))], [0, 1], {"training.dev_split": 32}),
        ([Axis("lora.rank", (2, 4))], [0, 1], {"training.dev_split": 64}),
    ]:
        with pytest.raises(LoraKitError, match="holds another sweep"):
            Sweep(None, axes, seeds, overrides, out).prepare()
    assert json.loads((out / "sweep.json").read_text()) == plan


def _row(point: str, seed: int, dev: float, val: float) -> dict:
    return {
        "point": point,
        "rank": point,
        "seed": seed,
        "metric": "accuracy",
        "dev_accuracy": dev,
        "validation_accuracy": val,
        "trainable_params": 10,
        "adapter_kib": 1.0,
        "examples_per_sec": 5.0,
        "train_time_s": 2.0,
    }


def test_summary_ranks_on_dev_and_reports_sample_std() -> None:
    rows = [
        _row("a", 0, 0.80, 0.95),
        _row("a", 1, 0.82, 0.93),
        _row("b", 0, 0.90, 0.70),
        _row("b", 1, 0.86, 0.72),
    ]
    on_dev = summarize(rows, ["rank"], "dev")
    assert [p["point"] for p in on_dev] == ["b", "a"]  # validation would say a
    assert on_dev[0]["dev"] == pytest.approx([90.0, 86.0])
    assert std([90.0, 86.0]) == pytest.approx(2.8284271)  # sample, not population
    assert [p["point"] for p in summarize(rows, ["rank"], "validation")] == ["a", "b"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    data = root / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 240, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 16, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "data": data, "root": root}


def _command(env: dict[str, Path], out: Path, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "lorakit", "sweep",
        "--model", str(env["model"]), "--data_dir", str(env["data"]),
        "--grid", "rank=2,4", "--seeds", "0,1", "--dev_split", "32",
        "--batch_size", "8", "--learning_rate", "1e-2", "--num_epochs", str(epochs),
        "--eval_steps", "5", "--logging_steps", "5", "--precision", "fp32",
        "--output_dir", str(out),
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LORAKIT_THREADS", None)  # OMP_NUM_THREADS alone fixes the count
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_tiny_sweep_writes_its_three_files(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = _run(_command(env, out, 1))
    assert result.returncode == 0, result.stderr
    assert "4 runs (2 points x 2 seeds), 0 already done; chosen on the dev set" in result.stdout
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["rank"], r["seed"]) for r in rows] == [
        ("2", "0"),
        ("2", "1"),
        ("4", "0"),
        ("4", "1"),
    ]
    for row in rows:
        summary = json.loads((out / "runs" / row["run"] / "summary.json").read_text())
        assert float(row["dev_accuracy"]) == summary["best_dev"]["accuracy"]
        assert float(row["validation_accuracy"]) == summary["best_eval"]["accuracy"]
        assert int(row["trainable_params"]) == summary["trainable_params"]
        assert row["selected_on"] == "dev" and float(row["adapter_kib"]) > 0
        config = (out / "configs" / f"{row['run']}.yaml").read_text()
        assert f"rank: {row['rank']}" in config and f"seed: {row['seed']}" in config
    # Rank 4 has twice rank 2's LoRA parameters (the head is the same).
    by_rank = {r["rank"]: int(r["trainable_params"]) for r in rows}
    assert by_rank["4"] > by_rank["2"]
    md = (out / "sweep.md").read_text()
    assert "4 of 4 runs done" in md and "Ranked by the mean **dev** score" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| 1 ") or ln.startswith("| 2 ")]
    assert len(table) == 2 and all(" ± " in ln for ln in table)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # Rerunning a finished sweep runs nothing; another grid in the same directory is refused.
    again = _run(_command(env, out, 1))
    assert again.returncode == 0 and "4 already done" in again.stdout
    other = _run([*_command(env, out, 1), "--alpha", "4"])
    assert other.returncode == 1 and "holds another sweep" in other.stderr
    # A key both swept and fixed by a flag is refused, not silently swept.
    both = _run([*_command(env, out, 1), "--rank", "8"])
    assert both.returncode == 1 and both.stderr.count("\n") == 1
    assert "--grid sweeps lora.rank, which a flag also sets" in both.stderr


def test_killed_sweep_resumes_without_redoing_finished_runs(
    env: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    cmd = _command(env, out, 6)
    second = out / "runs" / "rank=2,seed=1"
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (second / "checkpoint").is_dir() and time.monotonic() < deadline:
            assert proc.poll() is None, "the sweep ended before its second run checkpointed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running train, at once
        proc.wait()
    first = out / "runs" / "rank=2,seed=0" / "summary.json"
    assert first.is_file() and not (second / "summary.json").exists()
    finished_at = first.stat().st_mtime_ns
    result = _run(cmd)
    assert result.returncode == 0, result.stderr
    assert "1 already done" in result.stdout
    assert first.stat().st_mtime_ns == finished_at  # not redone
    assert "↻ Resumed from checkpoint" in (second / "training_log.txt").read_text()
    assert len(list(csv.DictReader((out / "sweep.csv").open()))) == 4


def test_sweep_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--grid", "rank=4,x", "--output_dir", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit sweep: error: run rank=x,seed=42: lora.rank must be")
    assert "\n" not in err


def test_sigint_to_the_sweep_checkpoints_the_running_run_and_exits_130(
    env: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    run = out / "runs" / "rank=2,seed=0"
    proc = subprocess.Popen(
        _command(env, out, 40), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run / "checkpoint").is_dir() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # to the sweep alone: it passes it on to the run
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; rerun the same command to continue" in stdout
    assert (run / "checkpoint").is_dir() and not (run / "summary.json").exists()
    assert "interrupted at step" in (out / "logs" / "rank=2,seed=0.log").read_text()
