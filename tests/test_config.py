"""Configuration: shipped configs load, overrides win, bad values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.errors import LoraKitError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.lora.rank > 0 and config.training.num_epochs > 0
    first = path.read_text().splitlines()[0]
    assert first.startswith("# lorakit train --config configs/" + path.name)


def test_bert_base_config_has_the_note_values() -> None:
    c = load_config(Path(__file__).parent.parent / "configs" / "sst2_bert_base.yaml")
    assert (c.model_name, c.lora.rank, c.lora.alpha, c.lora.dropout) == (
        "bert-base-uncased",
        8,
        16.0,
        0.05,
    )
    assert c.lora.target_modules == ["query", "key", "value", "dense"]
    t = c.training
    assert (t.num_epochs, t.batch_size, t.learning_rate, t.max_length, t.warmup_ratio) == (
        3,
        16,
        3e-4,
        128,
        0.1,
    )


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 4\ntraining:\n  batch_size: 8\n")
    c = load_config(path, {"lora.rank": 16, "data.subset": "mrpc"})
    assert (c.lora.rank, c.training.batch_size, c.data.subset) == (16, 8, "mrpc")
    assert c.training.learning_rate == 3e-4  # default kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora:\n  rnak: 4\n", "unknown config key 'lora.rnak'"),
        ("trainer:\n  x: 1\n", "unknown config key 'trainer'"),
        ("lora:\n  rank: four\n", "lora.rank must be an integer"),
        ("lora:\n  rank: 0\n", "rank must be positive"),
        ("lora:\n  dropout: 1.0\n", r"dropout must be in \[0, 1\)"),
        ("training:\n  precision: fp8\n", "precision must be one of"),
        ("training:\n  overwrite: maybe\n", "must be true or false"),
        ("lora: [1, 2]\n", "must be a mapping"),
        ("- a\n- b\n", "mapping at the top level"),
        ("lora: {rank: 4\n", "not valid YAML"),
        ("training:\n  push_to_hub: true\n", "needs --hub_model_id"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(LoraKitError, match=message):
        load_config(path)


def test_cli_bad_config_one_line_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: -1\n")
    assert main(["train", "--config", str(path), "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank must be positive" in err
    assert not (tmp_path / "o").exists()
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--rank", "x"],
        ["train", "--no_such_flag"],
        ["train", "--precision", "fp8"],
        ["nonsense"],
    ],
)
def test_cli_bad_flags_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_flags_from_the_note_exist(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--num_epochs",
        "--rank",
        "--alpha",
        "--learning_rate",
        "--batch_size",
        "--max_length",
        "--push_to_hub",
        "--hub_model_id",
        "--hub_private",
        "--model",
        "--task",
        "--data_dir",
        "--output_dir",
        "--seed",
        "--precision",
        "--target_modules",
        "--max_train_samples",
        "--max_eval_samples",
        "--max_steps",
        "--eval_steps",
        "--overwrite",
        "--resume",
    ):
        assert flag in text, flag
