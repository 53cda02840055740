"""docs/tutorial.md and its Traditional Chinese twin: every command runs, every quoted line of
lora.py is in lora.py, and the parameter statistics are what MiniLM really gives."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import save_tiny_model_dir, write_sentiment_rows

from lorakit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = {lang: ROOT / "docs" / name for lang, name in
        (("en", "tutorial.md"), ("zh-TW", "tutorial.zh-TW.md"))}  # fmt: skip
SETUP = ("bash scripts/setup.sh", "source .venv/bin/activate")  # what CI's setup already did


def _blocks(text: str, kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", text, flags=re.S)


def _commands(path: Path) -> list[str]:
    lines = [ln.strip() for b in _blocks(path.read_text(), "bash") for ln in b.splitlines()]
    return [ln for ln in lines if ln and ln not in SETUP]


def test_both_tutorials_run_the_same_commands_and_quote_the_same_code() -> None:
    en, zh = (DOCS[lang].read_text() for lang in ("en", "zh-TW"))
    assert _commands(DOCS["en"]) == _commands(DOCS["zh-TW"])
    assert _blocks(en, "python") == _blocks(zh, "python")
    assert _blocks(en, "text") == _blocks(zh, "text")
    assert len(_commands(DOCS["en"])) >= 10


def test_quoted_code_is_in_lora_py() -> None:
    source = {ln.strip() for ln in (ROOT / "src/lorakit/lora.py").read_text().splitlines()}
    quoted = [
        ln.strip() for b in _blocks(DOCS["en"].read_text(), "python") for ln in b.splitlines()
    ]
    assert quoted and [ln for ln in quoted if ln and ln not in source] == []


def test_parameter_statistics_are_the_shipped_configs() -> None:
    """The block the tutorial quotes is what the shipped SST-2 config prints on MiniLM."""
    from lorakit.config import load_config
    from lorakit.inject import apply_lora_to_model
    from lorakit.models import load_model
    from lorakit.state import (
        count_lora_parameters,
        format_parameter_stats,
        mark_only_lora_as_trainable,
    )

    lora = load_config(ROOT / "configs" / "sst2_minilm.yaml").lora
    model = load_model("minilm", {0: "negative", 1: "positive"})
    apply_lora_to_model(model, list(lora.target_modules), lora.rank, lora.alpha)
    mark_only_lora_as_trainable(model)
    printed = format_parameter_stats(count_lora_parameters(model), lora.describe())
    assert _blocks(DOCS["en"].read_text(), "text") == [printed + "\n"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_tutorial_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a fresh directory, on a tiny model: --data_dir points at tiny data, the dev split
    and the sweep are scaled down (one seed), and the server listens on a free port."""
    data = tmp_path / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 96, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 16, seed=1)
    model = save_tiny_model_dir(tmp_path / "tiny")
    work = tmp_path / "work"
    shutil.copytree(ROOT / "configs", work / "configs")
    monkeypatch.chdir(work)
    port = _free_port()
    tiny = ["--model", str(model), "--precision", "fp32", "--learning_rate", "1e-2"]
    tiny += ["--max_length", "32"]  # the tiny model has 64 positions
    server = None
    try:
        for command in _commands(DOCS["en"]):
            command = command.replace("../shared/data", str(data))
            command = command.replace("--dev_split 2000", "--dev_split 16")
            command = command.replace("--dev_split 1000", "--dev_split 16")
            # The sweeps' budgets, scaled down: 2 grid points a sweep, 2 TPE trials.
            command = command.replace('--grid "rank=4,8,16"', '--grid "rank=4"')
            command = command.replace('--grid "rank=8,32"', '--grid "rank=8"')
            command = command.replace("=5e-4,1e-3,2e-3,4e-3", "=5e-4,1e-3")
            command = command.replace("--trials 8", "--trials 2")
            command = command.replace("8080", str(port))
            words = shlex.split(command)
            if words[:2] in (["lorakit", "train"], ["lorakit", "sweep"]):
                flags = list(tiny)
                if any(w.startswith("learning_rate=") for w in words):  # searched, not fixed
                    flags = [f for f in flags if f not in ("--learning_rate", "1e-2")]
                if words[1] == "sweep" and "--search" not in words:
                    flags += ["--seeds", "0"]  # a search runs one seed a trial
                words += flags
            if words[:2] == ["lorakit", "serve"]:
                server = subprocess.Popen(
                    [sys.executable, "-m", "lorakit", *words[1:]],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                _wait_healthy(port, server)
            elif words[0] == "curl":
                out = subprocess.run(words, capture_output=True, text=True, timeout=60, check=True)
                scores = json.loads(out.stdout)
                assert {s["label"] for s in scores} == {"negative", "positive"}, out.stdout
            else:
                assert words[0] == "lorakit", command
                assert main(words[1:]) == 0, command
        capsys.readouterr()
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    assert (work / "runs/sst2/best/adapter_config.json").is_file()
    assert (work / "runs/sst2-merged/config.json").is_file()
    assert (work / "runs/sst2.onnx").is_file()
    md = (work / "sweeps/rank-targets/sweep.md").read_text()
    assert "2 of 2 runs done" in md
    for search, trials in (("search_grid", 2), ("search_tpe", 2)):
        rows = (work / "sweeps" / search / "sweep.csv").read_text().splitlines()
        assert len(rows) == trials + 1, rows  # every trial, complete or pruned


def _wait_healthy(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"lorakit serve exited: {server.stderr.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("lorakit serve did not become healthy")
