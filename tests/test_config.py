"""Configuration: shipped configs load, overrides win, bad values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_model

from lorakit.cli import main
from lorakit.config import load_config, save_config
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


@pytest.mark.parametrize(
    ("text", "value"),
    [("5e-4", 5e-4), ("1e-3", 1e-3), ("2E-5", 2e-5), (".5e-3", 5e-4), ("1.0e-3", 1e-3)],
)
def test_exponent_floats_are_numbers(tmp_path: Path, text: str, value: float) -> None:
    # PyYAML's safe_load (YAML 1.1) reads all but the last two as strings.
    path = tmp_path / "c.yaml"
    path.write_text(f"training:\n  learning_rate: {text}\n  weight_decay: {text}\n")
    t = load_config(path).training
    assert t.learning_rate == value and t.weight_decay == value
    assert isinstance(t.learning_rate, float)


def test_yaml_stays_safe(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  output_dir: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(LoraKitError, match="not valid YAML"):
        load_config(path)


def test_saved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(
        None,
        {
            "training.learning_rate": 5e-4,
            "training.weight_decay": 1e-20,
            "training.output_dir": "1e5",  # a string our loader would read as a float unquoted
            "training.hub_model_id": "2E-5",
            "lora.target_modules": r".*\.(query|value)",
            "data.text_columns": ["sentence1", "sentence2"],
        },
    )
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        ("all-linear", "all-linear"),
        ('".*\\\\.layer\\\\.0\\\\..*\\\\.(query|value)"', r".*\.layer\.0\..*\.(query|value)"),
        ("[query, value]", ["query", "value"]),
        ("query, value", ["query", "value"]),
        ("query", ["query"]),
    ],
)
def test_target_modules_from_yaml(tmp_path: Path, yaml_value: str, expected: object) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"lora:\n  target_modules: {yaml_value}\n")
    assert load_config(path).lora.target_modules == expected


def test_bad_target_regex_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('lora:\n  target_modules: ".*(query"\n')
    with pytest.raises(LoraKitError, match="lora.target_modules '.*\\(query' is not a valid regex"):
        load_config(path)


BERT_LINEAR = [  # every nn.Linear of the tiny BERT classifier but its head
    *(
        f"bert.encoder.layer.{i}.{leaf}"
        for i in (0, 1)
        for leaf in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ),
    "bert.pooler.dense",
]


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all-linear", BERT_LINEAR),
        (
            r".*\.layer\.0\..*\.(query|value)",
            [
                "bert.encoder.layer.0.attention.self.query",
                "bert.encoder.layer.0.attention.self.value",
            ],
        ),
        (
            "key",
            ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.1.attention.self.key"],
        ),
    ],
)
def test_configured_targets_select_layers(
    tmp_path: Path,
    targets: str,
    expected: list[str],
    peft,  # noqa: ANN001
) -> None:
    """The config's target_modules wrap exactly these layers; the saved adapter says the same
    to PEFT (a list of names, which PEFT matches exactly or by dotted suffix)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from torch import nn

    from lorakit import apply_lora_to_model, save_adapter
    from lorakit.adapter import read_adapter_config

    path = tmp_path / "c.yaml"
    path.write_text(f"lora:\n  target_modules: '{targets}'\n")
    config = load_config(path)
    model = make_model("bert")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    wrapped = apply_lora_to_model(model, config.lora.target_modules, rank=2)
    assert sorted(wrapped) == sorted(expected)
    saved = read_adapter_config(save_adapter(model, tmp_path / "a"))["target_modules"]
    assert isinstance(saved, list)
    peft_config = peft.LoraConfig(target_modules=saved)
    assert sorted(n for n in linear if check_target_module_exists(peft_config, n)) == sorted(
        expected
    )


def test_all_linear_covers_gpt2_conv1d_but_not_the_head() -> None:
    from transformers.pytorch_utils import Conv1D

    from lorakit import apply_lora_to_model

    model = make_model("gpt2")
    conv = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    wrapped = apply_lora_to_model(model, "all-linear", rank=2)
    assert len(conv) == 8 and sorted(wrapped) == sorted(conv)  # c_attn, c_proj, c_fc, mlp.c_proj
    assert "score" not in wrapped
