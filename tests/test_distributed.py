"""`torchrun -m lorakit train` on 2 CPU processes (gloo, 1 thread each): the same run as one
process with the global batch, a killed process ends the job, resume on another world size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model_dir, write_sentiment_rows
from safetensors.torch import load_file

from lorakit.checkpoint import check_resume
from lorakit.cli import main
from lorakit.train import OUTPUTS

LAUNCH_TIMEOUT = 120  # seconds; a torchrun job here takes ~10 s (mostly imports)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    # 49 rows: steps of 16, 16, 16 and 1, so the last step leaves process 1 no row.
    write_sentiment_rows(root / "small" / "sst2" / "train.tsv", 49, seed=0)
    write_sentiment_rows(root / "small" / "sst2" / "validation.tsv", 16, seed=1)
    write_sentiment_rows(root / "large" / "sst2" / "train.tsv", 960, seed=2)
    write_sentiment_rows(root / "large" / "sst2" / "validation.tsv", 16, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "root": root}


def _args(env: dict[str, Path], out: Path, data: str, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(env["model"]),
        "--data_dir",
        str(env["root"] / data),
        "--output_dir",
        str(out),
        "--learning_rate",
        "1e-2",
        "--num_epochs",
        "2",
        "--logging_steps",
        "2",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--dropout",
        "0",  # masks drawn per process differ from one process's: compare without
        "--precision",
        "fp32",
        *extra,
    ]


def _torchrun(args: list[str]) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 -m lorakit ARGS`` (torchrun is this module)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "lorakit", *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    environ.pop("LORAKIT_THREADS", None)  # one thread per process, as torchrun sets it
    return subprocess.Popen(
        command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_same_run(a: Path, b: Path) -> None:
    """The same adapter and metrics, but for float rounding (another order of summation).

    Adam divides by the gradient's running RMS, so an element whose gradient is ~0 can move by
    a rounding-sized gradient times lr: 1e-4 allows that, and is 100x below what a step with
    other rows does to this model (~2e-2).
    """
    ta = load_file(str(a / "final" / "adapter_model.safetensors"))
    tb = load_file(str(b / "final" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-4, rtol=0)
    ea, eb = _records(a, "eval"), _records(b, "eval")
    assert [(r["step"], r["accuracy"]) for r in ea] == [(r["step"], r["accuracy"]) for r in eb]
    assert [r["loss"] for r in eb] == pytest.approx([r["loss"] for r in ea], abs=1e-5)
    tra, trb = _records(a, "train"), _records(b, "train")
    assert [r["step"] for r in tra] == [r["step"] for r in trb]
    assert [r["loss"] for r in trb] == pytest.approx([r["loss"] for r in tra], abs=1e-5)
    assert [r["accuracy"] for r in trb] == [r["accuracy"] for r in tra]


def test_two_processes_of_8_equal_one_of_16(env: dict[str, Path], tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(env, one, "small", "--batch_size", "16")) == 0
    job = _torchrun(_args(env, two, "small", "--batch_size", "8"))
    stdout, stderr = job.communicate(timeout=LAUNCH_TIMEOUT)
    assert job.returncode == 0, stderr
    _assert_same_run(one, two)
    assert sorted(p.name for p in two.iterdir()) == sorted(OUTPUTS)  # one writer, no strays
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["processes"], summary["global_batch"], summary["global_steps"]) == (2, 16, 8)
    # Rank 0 alone prints (and logs): one banner, one summary line.
    assert stdout.count("🚀") == 1 and stdout.count('{"best_eval_accuracy"') == 1
    log = (two / "training_log.txt").read_text()
    assert log.count("🚀") == 1 and "x 2 processes" in log


def test_class_weighted_steps_are_the_same_on_two_processes(
    env: dict[str, Path], tmp_path: Path
) -> None:
    """Each process weighs its rows by the whole step's Σ w (the last step leaves process 1 no
    row): the adapter and the evaluations are one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    weights = ("--class_weights", "1,3")
    assert main(_args(env, one, "small", "--batch_size", "16", *weights)) == 0
    job = _torchrun(_args(env, two, "small", "--batch_size", "8", *weights))
    _, stderr = job.communicate(timeout=LAUNCH_TIMEOUT)
    assert job.returncode == 0, stderr
    ta = load_file(str(one / "final" / "adapter_model.safetensors"))
    tb = load_file(str(two / "final" / "adapter_model.safetensors"))
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-4, rtol=0)
    ea, eb = _records(one, "eval"), _records(two, "eval")
    assert [r["accuracy"] for r in ea] == [r["accuracy"] for r in eb]
    assert json.loads((two / "summary.json").read_text())["class_weights"] == {
        "negative": 1.0,
        "positive": 3.0,
    }


def test_adalora_processes_mask_as_one_does(env: dict[str, Path], tmp_path: Path) -> None:
    """Every process scores the triplets on the all-reduced gradients: the masks agree, so two
    processes of 8 train the same adapter, and keep the same ranks, as one of 16."""
    adalora = ["--variant", "adalora", "--target_r", "2", "--tinit", "1", "--tfinal", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(env, one, "small", "--batch_size", "16", *adalora)) == 0
    job = _torchrun(_args(env, two, "small", "--batch_size", "8", *adalora))
    _, stderr = job.communicate(timeout=LAUNCH_TIMEOUT)
    assert job.returncode == 0, stderr
    _assert_same_run(one, two)
    ranks = [json.loads((d / "summary.json").read_text())["adalora_ranks"] for d in (one, two)]
    assert ranks[0] == ranks[1] and sum(ranks[0].values()) == 2 * len(ranks[0])
    patterns = [json.loads((d / "final" / "adapter_config.json").read_text()) for d in (one, two)]
    assert patterns[0]["rank_pattern"] == patterns[1]["rank_pattern"]


def _worker(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's child process of ``rank`` (read from its environment)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{torchrun_pid}\n" not in status.read_text():
                continue
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    raise AssertionError(f"no worker of rank {rank} under {torchrun_pid}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_killed_process_ends_the_job_and_it_resumes_on_one(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, reference = tmp_path / "killed", tmp_path / "reference"
    job = _torchrun(_args(env, out, "large", "--batch_size", "8", "--eval_steps", "5"))
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not state.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.poll() is None, job.communicate()[1]  # still training (120 steps to go)
    os.kill(_worker(job.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0
    assert time.monotonic() - killed < 30, "the job outlived its killed process too long"
    assert "Signal 9 (SIGKILL)" in stderr  # torchrun names the root cause
    assert 'lorakit/train.py", line' not in stderr  # rank 0: one line, not a traceback
    saved = json.loads(state.read_text())
    assert (saved["world_size"], saved["global_batch"]) == (2, 16)
    assert 5 <= saved["global_step"] < 120

    # Resume on one process: refused unless the global batch stays 16 ...
    capsys.readouterr()
    resume = ["train", "--resume", "--output_dir", str(out)]
    assert main([*resume, "--batch_size", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "global batch" in err
    assert "8 x 2 x 1 = 16 -> 8 x 1 x 1 = 8" in err
    assert json.loads(state.read_text()) == saved  # untouched
    # ... then ends where one uninterrupted process of 16 ends, here as 8 x 2 accumulation.
    assert main([*resume, "--batch_size", "8", "--gradient_accumulation_steps", "2"]) == 0
    assert main(_args(env, reference, "large", "--batch_size", "16", "--eval_steps", "5")) == 0
    _assert_same_run(reference, out)


def test_ddp_all_reduces_only_the_trainable_parameters(env: dict[str, Path]) -> None:
    import torch.distributed as dist

    from lorakit.config import load_config
    from lorakit.distributed import World
    from lorakit.train import build_model

    config = load_config(None, {"model_name": str(env["model"])})
    model = build_model(config, ("negative", "positive"), torch.device("cpu"))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = World(rank=0, size=2).wrap(model)  # size 2: wrap as for two; the group has one
        info = ddp._get_ddp_logging_data()  # type: ignore[operator]
    finally:
        dist.destroy_process_group()
    assert info["total_parameter_size_bytes"] == trainable < total / 4
    assert sum(int(b) for b in info["bucket_sizes"].split(", ")) == trainable


def test_accumulation_is_another_split_of_the_same_steps(
    env: dict[str, Path], tmp_path: Path
) -> None:
    """Length-grouped, 49 rows: the short step falls mid-epoch, and still holds the same rows."""
    one = tmp_path / "one"
    assert main(_args(env, one, "small", "--batch_size", "16")) == 0
    assert (
        main(
            _args(
                env,
                tmp_path / "acc",
                "small",
                "--batch_size",
                "8",
                "--gradient_accumulation_steps",
                "2",
            )
        )
        == 0
    )
    _assert_same_run(one, tmp_path / "acc")


def _config(batch: int, accumulation: int = 1) -> dict:
    return {"training": {"batch_size": batch, "gradient_accumulation_steps": accumulation}}


def test_resume_may_split_the_global_batch_otherwise_not_change_it() -> None:
    check_resume(_config(16), _config(32), saved_processes=2, processes=1)
    check_resume(_config(16), _config(16, 2), saved_processes=2, processes=1)
    check_resume(_config(32), _config(8), saved_processes=1, processes=4)
    with pytest.raises(Exception, match=r"global batch .* 16 x 2 x 1 = 32 -> 16 x 1 x 1 = 16"):
        check_resume(_config(16), _config(16), saved_processes=2, processes=1)


def test_doctor_lists_the_backends() -> None:
    from lorakit.doctor import run_checks

    ok, _, detail = next(c for c in run_checks() if c[1] == "distributed")  # before the slow ones
    assert ok and "gloo" in detail


def test_a_missing_process_ends_in_an_error_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of 2 waits for a rank 1 that never comes: LORAKIT_DIST_TIMEOUT, then one line."""
    import socket

    from lorakit.distributed import start
    from lorakit.errors import LoraKitError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "LORAKIT_DIST_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(name, value)
    began = time.monotonic()
    with pytest.raises(LoraKitError, match="process 0 of 2 cannot join the others"):
        start(torch.device("cpu"))
    assert time.monotonic() - began < 15
