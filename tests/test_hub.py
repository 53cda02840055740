"""Adapters by Hub id: from the Hugging Face cache offline, a fast clear failure without the Hub."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from tiny_adapter import make_adapter, make_base

from lorakit.adapter import read_adapter_config
from lorakit.cli import build_parser, main
from lorakit.hub import model_card

REPO = "someone/tiny-sst2"
SHA = "0123456789abcdef0123456789abcdef01234567"
SUMMARY = {
    "best_epoch": 2,
    "best_eval": {"accuracy": 0.9, "f1": 0.89},
    "trainable_params": 1234,
    "total_params": 56789,
    "num_epochs": 3,
    "batch_size": 32,
    "learning_rate": 5e-4,
}


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache and a Hub endpoint nobody listens on (a closed local port)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    return make_adapter(root / "adapter", make_base(root / "base"))


def _card_commands(card: str) -> list[list[str]]:
    lines = [line.strip() for line in card.splitlines() if line.strip().startswith("lorakit ")]
    return [shlex.split(line)[1:] for line in lines]


def test_model_card_commands_parse() -> None:
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "num_labels": 2}
    commands = _card_commands(model_card({**config, "id2label": {"0": "neg"}}, SUMMARY, REPO))
    assert commands
    for argv in commands:
        build_parser().parse_args(argv)  # argparse exits (SystemExit 2) on a rejected command


@pytest.mark.parametrize("command", ["predict", "eval", "merge", "export"])
def test_unreachable_hub_fails_fast_and_says_so(
    command: str, hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = {"merge": ["--out", str(tmp_path / "m")], "export": ["--out", str(tmp_path / "m.onnx")]}
    argv = [command, "--adapter", REPO, *out.get(command, [])]
    if command == "predict":
        argv += ["--text", "fine"]
    start = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "Hugging Face Hub" in err and "could not be reached" in err, err


def test_offline_without_cache_says_so(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["predict", "--adapter", REPO, "--text", "fine"]) == 1
    assert "nor in the Hugging Face cache, and HF_HUB_OFFLINE is set" in capsys.readouterr().err


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_cached_adapter_runs_the_model_card_command(
    offline: bool,
    adapter: Path,
    hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = hub_cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    shutil.copytree(adapter, snapshot)
    card = model_card(read_adapter_config(adapter), SUMMARY, REPO)
    (snapshot / "README.md").write_text(card)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)

    [argv] = [a for a in _card_commands(card) if a[0] == "predict"]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(["predict", "--adapter", str(adapter), "--text", argv[-1], "--json"]) == 0
    assert got == json.loads(capsys.readouterr().out)
