"""The CUDA paths: bf16 and fp16 autocast (fp16 with its GradScaler), prediction and serving on
the GPU against the CPU in fp32, and torchrun over NCCL. Each test skips, saying why, where
``torch.cuda.is_available()`` is False; README.md says what has been verified on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import interrupt_at, save_tiny_model_dir, write_sentiment_rows
from safetensors.torch import load_file
from tiny_adapter import make_adapter, make_base

from lorakit.cli import main
from lorakit.predict import Predictor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TEXTS = ["the movie was good", "not a great film", "fine", "bad bad bad movie, not fine at all"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda")
    base = make_base(root / "base")
    write_sentiment_rows(root / "data" / "sst2" / "train.tsv", 64, seed=0)
    write_sentiment_rows(root / "data" / "sst2" / "validation.tsv", 16, seed=1)
    return {
        "root": root,
        "adapter": make_adapter(root / "adapter", base),
        "model": save_tiny_model_dir(root / "model"),
    }


def _train_args(env: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(env["model"]),
        "--data_dir",
        str(env["root"] / "data"),
        "--output_dir",
        str(out),
        "--num_epochs",
        "2",
        "--batch_size",
        "16",
        "--learning_rate",
        "1e-2",
        "--logging_steps",
        "1",
        *extra,
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_in_each_precision(env: dict[str, Path], precision: str) -> None:
    out = env["root"] / f"run-{precision}"
    argv = _train_args(env, out, "--device", "cuda", "--precision", precision)
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == precision
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses))
    if precision == "fp16":  # the scale lives in the checkpoint for an exact resume
        assert (out / "checkpoint").is_dir()


def test_fp16_ctrl_c_then_resume_on_cuda_is_exact(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA's RNG and the GradScaler's scale come back from the checkpoint."""

    whole, split = env["root"] / "whole", env["root"] / "split"
    flags = ("--device", "cuda", "--precision", "fp16", "--dropout", "0.1")
    assert main(_train_args(env, whole, *flags)) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        assert main(_train_args(env, split, *flags)) == 130
    assert main(["train", "--resume", "--output_dir", str(split)]) == 0
    a = load_file(str(whole / "final" / "adapter_model.safetensors"))
    b = load_file(str(split / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predict_on_cuda_matches_the_cpu(env: dict[str, Path], precision: str) -> None:
    cpu = Predictor.from_adapter(env["adapter"], device="cpu", precision="fp32")
    gpu = Predictor.from_adapter(env["adapter"], device="cuda", precision=precision)
    tol = 1e-4 if precision == "fp32" else 2e-2
    for a, b in zip(gpu.predict(TEXTS), cpu.predict(TEXTS), strict=True):
        for label, p in b["probs"].items():
            assert a["probs"][label] == pytest.approx(p, abs=tol)


def test_serving_on_cuda_matches_the_cpu(env: dict[str, Path]) -> None:
    from lorakit.multi import AdapterSet

    sets = {d: AdapterSet(str(env["root"] / "base"), torch.device(d)) for d in ("cpu", "cuda")}
    for s in sets.values():
        s.load("a", env["adapter"])
    tokens = sets["cpu"].tokenizer(TEXTS, padding=True, return_tensors="np")
    batch = {k: v.astype(np.int64) for k, v in tokens.items()}
    cpu, gpu = (np.stack(s.logits(batch, ["a"] * len(TEXTS))) for s in sets.values())
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="torchrun over NCCL needs two CUDA devices"
)
def test_torchrun_over_nccl(env: dict[str, Path]) -> None:
    out = env["root"] / "ddp"
    args = _train_args(env, out, "--device", "cuda", "--precision", "fp32")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "lorakit", *args]
    done = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
