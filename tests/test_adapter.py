"""Adapter directories: round trip, PEFT interop both ways, misfits that change nothing."""

from __future__ import annotations

import json
import logging
import re
import warnings
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


def test_adapter_files_follow_peft_layout(tmp_path: Path, peft) -> None:  # noqa: ANN001
    model = _trained_lora_model("bert")
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorakit.json",
    ]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["target_modules"] == ["dense", "key", "query", "value"]
    assert config["modules_to_save"] == ["classifier"] and config["bias"] == "none"
    assert set(config) <= set(peft.LoraConfig.__dataclass_fields__)  # PEFT's keys only
    meta = json.loads((tmp_path / "a" / "lorakit.json").read_text())
    assert meta["id2label"] == {"0": "negative", "1": "positive"} and meta["num_labels"] == 2
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


def _peft_logits(tmp_path: Path, family: str, adapter: Path) -> torch.Tensor:
    """Logits of real PEFT loading ``adapter`` onto the saved base model, with no warning."""
    import peft
    from transformers import AutoModelForSequenceClassification

    base_path = _save_base(tmp_path, family)
    base = AutoModelForSequenceClassification.from_pretrained(base_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(Unexpected|upgrade).*")
        peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    return _logits(peft_model)


def test_lorakit_adapter_loads_in_peft(tmp_path: Path, family: str, peft) -> None:  # noqa: ANN001
    ours = _trained_lora_model(family)
    save_adapter(ours, tmp_path / "a", task="sst2")
    got = _peft_logits(tmp_path, family, tmp_path / "a")
    torch.testing.assert_close(got, _logits(ours), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("bias", "modules_to_save"),
    [("all", None), ("lora_only", None), ("none", ["pooler"]), ("all", ["pooler"])],
)
def test_trained_biases_and_modules_reach_peft(
    tmp_path: Path,
    bias: str,
    modules_to_save: list[str] | None,
    peft,  # noqa: ANN001
) -> None:
    model = make_model("bert")
    apply_lora_to_model(model, ["query", "value"], rank=4, alpha=8)
    mark_only_lora_as_trainable(model, bias=bias, modules_to_save=modules_to_save)  # type: ignore[arg-type]
    _perturb_trainable(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["bias"] == bias
    assert config["modules_to_save"] == ["classifier"] + (
        ["bert.pooler"] if modules_to_save else []
    )
    saved = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k.removeprefix("base_model.model.") for k in saved} == {
        re.sub(r"\.adapters\.default\.(lora_[AB])$", r".\1.weight", n) for n in trained
    }
    torch.testing.assert_close(
        _peft_logits(tmp_path, "bert", tmp_path / "a"), _logits(model.eval()), atol=1e-5, rtol=1e-5
    )
    dst = make_model("bert")
    load_adapter(dst, tmp_path / "a")
    torch.testing.assert_close(_logits(dst.eval()), _logits(model), atol=1e-6, rtol=1e-6)
    assert {n for n, p in dst.named_parameters() if p.requires_grad} == trained


def test_layers_of_other_ranks_and_alphas_round_trip(tmp_path: Path, peft) -> None:  # noqa: ANN001
    model = make_model("bert")
    apply_lora_to_model(model, ["query", "value"], rank=4, alpha=8)
    apply_lora_to_model(model, ["dense"], rank=2, alpha=3)
    mark_only_lora_as_trainable(model)
    _perturb_trainable(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 3  # 6 dense layers outnumber 4
    assert set(config["rank_pattern"].values()) == {4} and len(config["rank_pattern"]) == 4
    assert set(config["alpha_pattern"].values()) == {8}
    dst = make_model("bert")
    load_adapter(dst, tmp_path / "a")
    torch.testing.assert_close(_logits(dst.eval()), _logits(model.eval()), atol=1e-6, rtol=1e-6)
    assert {layer.lora.rank for _, layer in lora_layers(dst)} == {2, 4}
    torch.testing.assert_close(
        _peft_logits(tmp_path, "bert", tmp_path / "a"), _logits(model), atol=1e-5, rtol=1e-5
    )


def _perturb_trainable(model: torch.nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_save_refuses_trainable_tensors_it_cannot_hold(tmp_path: Path) -> None:
    model = make_model("bert")
    apply_lora_to_model(model, ["query", "value"], rank=4, alpha=8)
    mark_only_lora_as_trainable(model)
    model.bert.embeddings.LayerNorm.weight.requires_grad_(True)  # half a module
    with pytest.raises(LoraKitError, match="LayerNorm.weight.*trainable"):
        save_adapter(model, tmp_path / "a")
    model.bert.embeddings.LayerNorm.weight.requires_grad_(False)
    model.bert.pooler.dense.bias.requires_grad_(True)  # one bias: neither "all" nor "lora_only"
    with pytest.raises(LoraKitError, match="biases are trainable"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_adapter_without_its_head_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_adapter(_trained_lora_model(), tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "classifier" not in k}, str(path))
    model = make_model("bert")
    before = _snapshot(model)
    with pytest.raises(LoraKitError, match=r"incomplete adapter.*classifier\.(weight|bias)"):
        load_adapter(model, tmp_path / "a")
    _assert_unchanged(model, before)


def test_adapter_missing_a_bias_its_config_promises_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = make_model("bert")
    apply_lora_to_model(model, ["query"], rank=4, alpha=8)
    mark_only_lora_as_trainable(model, bias="all")
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "LayerNorm" not in k}, str(path))
    with pytest.raises(LoraKitError, match=r"incomplete adapter.*LayerNorm\.bias.*bias='all'"):
        load_adapter(make_model("bert"), tmp_path / "a")


@pytest.mark.parametrize("bias", ["none", "all"])
def test_peft_adapter_loads_in_lorakit(
    tmp_path: Path,
    family: str,
    bias: str,
    peft,  # noqa: ANN001
) -> None:
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=FAMILIES[family][1],
        bias=bias,
        rank_pattern={FAMILIES[family][1][0]: 2},
        alpha_pattern={FAMILIES[family][1][-1]: 5},
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
            lambda d: (d.mkdir(), (d / "adapter_config.json").write_text('{"peft_type": "VERA"}')),
            "not a LoRA, IA³ or AdaLoRA",
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
                    ' "lora_bias": true}'
                ),
            ),
            "lora_bias",
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


def test_loading_under_a_taken_name_replaces_the_earlier_adapter(tmp_path: Path) -> None:
    wide = make_model("bert")
    apply_lora_to_model(wide, ["query", "value"], rank=4, alpha=8)
    narrow = make_model("bert", seed=1)
    apply_lora_to_model(narrow, ["query"], rank=2, alpha=4)
    for model, seed in ((wide, 3), (narrow, 4)):
        mark_only_lora_as_trainable(model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
    save_adapter(wide, tmp_path / "wide")
    save_adapter(narrow, tmp_path / "narrow")
    model = make_model("bert")
    load_adapter(model, tmp_path / "wide")
    load_adapter(model, tmp_path / "narrow")  # the same (default) name: value's LoRA must go
    fresh = make_model("bert")
    load_adapter(fresh, tmp_path / "narrow")
    torch.testing.assert_close(_logits(model), _logits(fresh), atol=0, rtol=0)
    adapted = [n for n, layer in lora_layers(model) if layer.active_adapter is not None]
    assert adapted and all(n.endswith("query") for n in adapted)


@pytest.mark.parametrize(
    ("file", "key", "value", "message"),
    [
        ("adapter_config.json", "r", "eight", "r must be a positive whole number, not 'eight'"),
        ("adapter_config.json", "lora_alpha", None, "lacks the required key 'lora_alpha'"),
        ("adapter_config.json", "lora_dropout", 2, "lora_dropout must be a number in [0, 1)"),
        ("adapter_config.json", "target_modules", 5, "target_modules must be a list"),
        ("lorakit.json", "max_length", "abc", "max_length must be a positive whole number"),
        ("lorakit.json", "id2label", {"x": 1}, "id2label must map label ids"),
    ],
)
def test_fields_of_the_wrong_type_are_one_line_errors(
    tmp_path: Path, file: str, key: str, value: object, message: str
) -> None:
    save_adapter(_trained_lora_model(), tmp_path / "a")
    path = tmp_path / "a" / file
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    model = make_model("bert")
    before = _snapshot(model)
    with pytest.raises(LoraKitError, match=re.escape(message)):
        load_adapter(model, tmp_path / "a")
    _assert_unchanged(model, before)
