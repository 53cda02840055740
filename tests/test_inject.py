"""Injection into whole models of each family: matching, identity, trainable set, merging."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_batch, make_model

from lorakit import (
    LinearWithLoRA,
    LoraKitError,
    apply_lora_to_model,
    count_lora_parameters,
    disable_adapter,
    format_parameter_stats,
    get_lora_state_dict,
    load_lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    unmerge_lora_weights,
)
from lorakit.inject import lora_layers


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _lora_model(family: str, seed: int = 0) -> torch.nn.Module:
    model = make_model(family, seed)
    apply_lora_to_model(model, FAMILIES[family][1], rank=4, alpha=8)
    mark_only_lora_as_trainable(model)
    return model


def _randomize_lora(model: torch.nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.lora_B.copy_(0.1 * torch.randn(layer.lora.lora_B.shape, generator=g))


def test_injection_keeps_outputs_and_never_wraps_head(family: str) -> None:
    base = make_model(family)
    model = make_model(family)
    batch = make_batch()
    replaced = apply_lora_to_model(model, FAMILIES[family][1], rank=4, alpha=8)
    assert replaced and all(isinstance(model.get_submodule(n), LinearWithLoRA) for n in replaced)
    assert not any(n.split(".")[0] in ("classifier", "score", "pre_classifier") for n in replaced)
    torch.testing.assert_close(_logits(model, batch), _logits(base, batch))


def test_applying_twice_does_not_stack(family: str) -> None:
    model = make_model(family)
    targets = FAMILIES[family][1]
    first = apply_lora_to_model(model, targets, rank=4, alpha=8)
    assert apply_lora_to_model(model, targets, rank=4, alpha=8) == []
    assert len(list(lora_layers(model))) == len(first)
    assert not any(isinstance(m.base_layer, LinearWithLoRA) for _, m in lora_layers(model))


def test_matching_is_exact_suffix_or_regex_never_substring() -> None:
    model = make_model("bert")
    # "quer" is a substring of "query" but not a name: no match, and the error lists real names.
    with pytest.raises(LoraKitError, match=r"matched no layer.*query"):
        apply_lora_to_model(model, ["quer"])
    replaced = apply_lora_to_model(
        make_model("bert"), r".*layer\.0\.attention\.self\.(query|value)"
    )
    assert replaced == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
    ]
    dotted = apply_lora_to_model(make_model("bert"), ["attention.output.dense"])
    assert dotted == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]


def test_roberta_head_dense_is_not_wrapped() -> None:
    model = make_model("roberta")
    replaced = apply_lora_to_model(model, ["dense"])
    assert replaced and not any(n.startswith("classifier") for n in replaced)
    assert isinstance(model.classifier.dense, torch.nn.Linear)


def test_only_lora_and_head_change_after_training(family: str) -> None:
    model = _lora_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = make_batch()
    for _ in range(3):
        loss = model(**batch, labels=torch.tensor([0, 1, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    heads = ("classifier", "score", "pre_classifier")
    assert any(".lora_B" in n for n in changed)
    assert any(n.startswith(heads) for n in changed)
    assert all(".adapters." in n or n.startswith(heads) for n in changed), changed


def test_merge_unmerge_and_disable_on_whole_model(family: str) -> None:
    base = make_model(family)
    model = _lora_model(family)
    _randomize_lora(model)
    batch = make_batch()
    y = _logits(model, batch)
    assert not torch.allclose(y, _logits(base, batch))
    merge_lora_weights(model)
    torch.testing.assert_close(_logits(model, batch), y, atol=1e-5, rtol=1e-5)
    merge_lora_weights(model)
    torch.testing.assert_close(_logits(model, batch), y, atol=1e-5, rtol=1e-5)
    with disable_adapter(model):
        torch.testing.assert_close(
            _logits(model, batch), _logits(base, batch), atol=1e-5, rtol=1e-5
        )
    assert all(layer.merged for _, layer in lora_layers(model))
    unmerge_lora_weights(model)
    base_weights = dict(base.named_parameters())
    for name, layer in lora_layers(model):
        torch.testing.assert_close(
            layer.base_layer.weight, base_weights[f"{name}.weight"], atol=1e-6, rtol=0
        )
    torch.testing.assert_close(_logits(model, batch), y, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip(family: str) -> None:
    src = _lora_model(family, seed=0)
    _randomize_lora(src)
    state = get_lora_state_dict(src)
    assert all(
        ".lora_" in k or k.startswith(("classifier", "score", "pre_classifier")) for k in state
    )
    dst = _lora_model(family, seed=0)
    load_lora_state_dict(dst, state)
    batch = make_batch()
    torch.testing.assert_close(_logits(dst, batch), _logits(src, batch))
    assert get_lora_state_dict(dst).keys() == state.keys()


def test_load_state_dict_misfit_changes_nothing() -> None:
    model = _lora_model("bert")
    before = {k: v.clone() for k, v in get_lora_state_dict(model).items()}
    bad = {k: torch.ones_like(v) for k, v in before.items()}
    bad["classifier.weight"] = torch.ones(5, 32)
    with pytest.raises(LoraKitError, match="classifier.weight"):
        load_lora_state_dict(model, bad)
    for k, v in get_lora_state_dict(model).items():
        assert torch.equal(v, before[k])


def test_parameter_counts_match_hand_computation() -> None:
    model = make_model("bert")
    apply_lora_to_model(model, ["query", "value"], rank=4, alpha=8)
    mark_only_lora_as_trainable(model)
    stats = count_lora_parameters(model)
    # 2 layers x (query, value) x r*(in+out) = 2*2*4*(32+32); head 32*2+2
    assert stats["trainable"] == 2 * 2 * 4 * 64 + (32 * 2 + 2)
    total = sum(p.numel() for p in make_model("bert").parameters()) + 2 * 2 * 4 * 64
    assert stats["total"] == total
    assert stats["frozen"] == total - stats["trainable"]
    assert stats["percentage"] == pytest.approx(100 * stats["trainable"] / total)
    text = format_parameter_stats(stats)
    assert "Parameter Statistics" in text and f"{stats['trainable']:,}" in text


def test_bert_base_counts_as_in_the_note() -> None:
    """rank 8 on query+value of BERT-base: 294,912 LoRA parameters, as the note says."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(num_labels=2)  # bert-base-uncased's shape
    with torch.device("meta"):
        model = BertForSequenceClassification(config)
    apply_lora_to_model(model, ["query", "value"], rank=8, alpha=16)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
    assert lora == 294_912
    apply_lora_to_model(model, ["key", "dense"], rank=8, alpha=16)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
    # query/key/value/attention.output.dense: 4*12*12,288; FFN dense in 768->3072 and 3072->768:
    # 2*12*8*(768+3072); pooler.dense: 12,288.
    assert lora == 4 * 12 * 12_288 + 2 * 12 * 8 * 3840 + 12_288


def test_bias_modes() -> None:
    model = _lora_model("bert")
    mark_only_lora_as_trainable(model, bias="lora_only")
    wrapped_biases = {f"{n}.base_layer.bias" for n, _ in lora_layers(model)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert wrapped_biases <= trainable
    assert "bert.embeddings.LayerNorm.bias" not in trainable
    mark_only_lora_as_trainable(model, bias="all")
    assert "bert.embeddings.LayerNorm.bias" in {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    with pytest.raises(LoraKitError):
        mark_only_lora_as_trainable(model, bias="some")  # type: ignore[arg-type]
