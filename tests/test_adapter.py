"""Adapter directories: round trip, PEFT interop both ways, misfits that change nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_batch, make_model
from safetensors.torch import load_file

from lorakit import (
    LoraKitError,
    apply_lora_to_model,
    get_lora_state_dict,
    load_adapter,
    mark_only_lora_as_trainable,
    save_adapter,
)
from lorakit.inject import lora_layers

peft = pytest.importorskip("peft")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_batch()).logits


def _trained_lora_model(family: str = "bert") -> torch.nn.Module:
    model = make_model(family)
    apply_lora_to_model(model, FAMILIES[family][1], rank=4, alpha=8, dropout=0.1)
    mark_only_lora_as_trainable(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_round_trip_same_logits_and_keys(tmp_path: Path, family: str) -> None:
    src = _trained_lora_model(family)
    save_adapter(src, tmp_path / "a", base_model_name_or_path="tiny", task="sst2")
    dst = make_model(family)
    config = load_adapter(dst, tmp_path / "a")
    torch.testing.assert_close(_logits(dst.eval()), _logits(src))
    assert get_lora_state_dict(dst).keys() == get_lora_state_dict(src).keys()
    assert config["task"] == "sst2" and config["r"] == 4 and config["lora_alpha"] == 8


def test_adapter_files_follow_peft_layout(tmp_path: Path) -> None:
    model = _trained_lora_model("bert")
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["target_modules"] == ["dense", "key", "query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["num_labels"] == 2
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.classifier.weight" in keys
    assert ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight") in keys
    assert all(k.startswith("base_model.model.") for k in keys)


def test_regex_subset_is_saved_as_exact_names(tmp_path: Path) -> None:
    model = make_model("bert")
    apply_lora_to_model(model, r".*layer\.1\.attention\.self\.query")
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["bert.encoder.layer.1.attention.self.query"]
    dst = make_model("bert")
    load_adapter(dst, tmp_path / "a")
    assert [n for n, _ in lora_layers(dst)] == config["target_modules"]


def _save_base(tmp_path: Path, family: str = "bert") -> Path:
    path = tmp_path / "base"
    make_model(family).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_lorakit_adapter_loads_in_peft(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForSequenceClassification

    base_path = _save_base(tmp_path, family)
    ours = _trained_lora_model(family)
    save_adapter(ours, tmp_path / "a", base_model_name_or_path=str(base_path))
    base = AutoModelForSequenceClassification.from_pretrained(base_path)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    torch.testing.assert_close(_logits(peft_model), _logits(ours), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_peft_adapter_loads_in_lorakit(tmp_path: Path, family: str) -> None:
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=FAMILIES[family][1],
        modules_to_save=["classifier" if family == "bert" else "score"],
    )
    peft_model = peft.get_peft_model(make_model(family), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "p")
    ours = make_model(family)
    load_adapter(ours, tmp_path / "p")
    torch.testing.assert_close(
        _logits(ours.eval()), _logits(peft_model.eval()), atol=1e-5, rtol=1e-5
    )


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not list(lora_layers(model))


def test_adapter_for_other_shapes_fails_and_leaves_model(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, BertConfig

    other = AutoModelForSequenceClassification.from_config(
        BertConfig(
            vocab_size=100,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    apply_lora_to_model(other, ["query", "value"], rank=4, alpha=8)
    save_adapter(other, tmp_path / "a")
    model = make_model("bert")
    before = _snapshot(model)
    with pytest.raises(LoraKitError, match=r"lora_A\.weight.*shape"):
        load_adapter(model, tmp_path / "a")
    _assert_unchanged(model, before)


def test_adapter_with_other_num_labels_fails(tmp_path: Path) -> None:
    save_adapter(_trained_lora_model("roberta"), tmp_path / "a")  # 3 labels
    model = make_model("bert")
    before = _snapshot(model)
    with pytest.raises(LoraKitError):
        load_adapter(model, tmp_path / "a")
    _assert_unchanged(model, before)


def test_adapter_targets_missing_in_model_fails(tmp_path: Path) -> None:
    save_adapter(_trained_lora_model("gpt2"), tmp_path / "a")
    model = make_model("bert")
    before = _snapshot(model)
    with pytest.raises(LoraKitError, match="matched no layer"):
        load_adapter(model, tmp_path / "a")
    _assert_unchanged(model, before)


def test_unknown_config_keys_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_adapter(_trained_lora_model(), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["some_future_option"] = 1
    path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        load_adapter(make_model("bert"), tmp_path / "a")
    assert "some_future_option" in caplog.text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "adapter_config.json is missing"),
        (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("{oops")), "not valid JSON"),
        (
            lambda d: (d.mkdir(), (d / "adapter_config.json").write_text('{"peft_type": "IA3"}')),
            "not a LoRA",
        ),
        (
            lambda d: (
                d.mkdir(),
                (d / "adapter_config.json").write_text(
                    '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"]}'
                ),
            ),
            "never pickle",
        ),
        (
            lambda d: (
                d.mkdir(),
                (d / "adapter_config.json").write_text(
                    '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"],'
                    ' "use_dora": true}'
                ),
            ),
            "use_dora",
        ),
    ],
)
def test_broken_adapter_dirs_are_clear_errors(tmp_path: Path, setup, message: str) -> None:
    d = tmp_path / "a"
    setup(d)
    model = make_model("bert")
    before = _snapshot(model)
    with pytest.raises(LoraKitError, match=message):
        load_adapter(model, d)
    _assert_unchanged(model, before)


def test_corrupt_safetensors_is_clear_error(tmp_path: Path) -> None:
    save_adapter(_trained_lora_model(), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LoraKitError, match="safetensors"):
        load_adapter(make_model("bert"), tmp_path / "a")


def test_save_replaces_existing_adapter_whole(tmp_path: Path) -> None:
    model = _trained_lora_model()
    save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "stale.txt").write_text("from an older save")
    save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
