"""Command line: Hugging Face flag spellings, one boolean style, -v anywhere, per-command help."""

from __future__ import annotations

import re

import pytest

from lorakit.cli import COMMANDS, build_parser, main
from lorakit.commands.flags import config_overrides
from lorakit.config import load_config
from lorakit.errors import LoraKitError


def _overrides(*argv: str) -> dict[str, object]:
    return config_overrides(build_parser().parse_args(argv))


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


@pytest.mark.parametrize(
    ("flag", "value", "key", "expected"),
    [
        ("--num_train_epochs", "2", "training.num_epochs", 2),
        ("--per_device_train_batch_size", "8", "training.batch_size", 8),
        ("--per_device_eval_batch_size", "128", "training.eval_batch_size", 128),
        ("--lora_r", "4", "lora.rank", 4),
        ("--lora_alpha", "32", "lora.alpha", 32.0),
        ("--lora_dropout", "0.1", "lora.dropout", 0.1),
        ("--warmup_ratio", "0.2", "training.warmup_ratio", 0.2),
    ],
)
def test_hugging_face_spellings_set_the_same_field(
    flag: str, value: str, key: str, expected: object
) -> None:
    overrides = _overrides("train", flag, value)
    assert overrides == {key: expected}
    section, field = key.split(".")
    assert getattr(getattr(load_config(None, overrides), section), field) == expected


def test_eval_batch_size_has_a_default_and_is_checked() -> None:
    assert load_config().training.eval_batch_size == 64
    with pytest.raises(SystemExit):
        _overrides("train", "--per_device_eval_batch_size", "x")
    with pytest.raises(LoraKitError, match="eval_batch_size must be positive"):
        load_config(None, {"training.eval_batch_size": 0})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["query", "value"], ["query", "value"]),
        (["query,value"], ["query", "value"]),
        (["all-linear"], "all-linear"),
        ([r".*\.layer\.0\..*\.(query|value)"], r".*\.layer\.0\..*\.(query|value)"),
    ],
)
def test_target_modules_flag(argv: list[str], expected: object) -> None:
    overrides = _overrides("train", "--target_modules", *argv)
    assert load_config(None, overrides).lora.target_modules == expected


@pytest.mark.parametrize(
    ("argv", "key", "value"),
    [
        (["train", "--overwrite"], "cfg:training.overwrite", True),
        (["train", "--no_overwrite"], "cfg:training.overwrite", False),
        (["train", "--no-overwrite"], "cfg:training.overwrite", False),  # argparse's, unlisted
        (["train", "--no_group_by_length"], "cfg:training.group_by_length", False),
        (["predict", "--adapter", "a"], "merge", True),
        (["predict", "--adapter", "a", "--no_merge"], "merge", False),
        (["predict", "--adapter", "a", "--no-merge"], "merge", False),
        (["merge", "--adapter", "a", "--out", "o"], "overwrite", False),
        (["export", "--adapter", "a", "--out", "o", "--overwrite"], "overwrite", True),
    ],
)
def test_boolean_flags(argv: list[str], key: str, value: bool) -> None:
    assert vars(build_parser().parse_args(argv))[key] is value


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_one_boolean_style_and_verbose(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    text = _help(capsys, command)
    assert not re.search(r"--no-\w", text), "negations are spelled --no_flag"
    assert "-v, --verbose" in text


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["-v", "train"], True),
        (["train", "-v"], True),
        (["train", "--rank", "4", "--verbose"], True),
        (["train"], False),
        (["doctor", "-v"], True),
    ],
)
def test_verbose_before_or_after_the_command(argv: list[str], verbose: bool) -> None:
    assert build_parser().parse_args(argv).verbose is verbose


def test_eval_help_speaks_of_evaluation(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "eval")
    assert "--batch_size INT examples per evaluation forward pass" in text
    assert "optimizer step" not in text
    assert "--model STR base model (default: the adapter's)" in text
    assert _overrides("eval", "--adapter", "a", "--batch_size", "7") == {
        "training.eval_batch_size": 7
    }


def test_train_help_lists_the_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "train")
    assert "--num_epochs INT, --num_train_epochs INT number of passes" in text
    assert "--rank INT, --lora_r INT, --init_r INT LoRA rank" in text
    assert "--overwrite, --no_overwrite allow writing" in text
