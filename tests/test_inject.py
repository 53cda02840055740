"""Injection into whole models of each family: matching, identity, trainable set, merging."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, MORE_FAMILIES, make_batch, make_model

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
    save_adapter,
    unmerge_lora_weights,
)
from lorakit.config import load_config
from lorakit.inject import apply_ia3_to_model, lora_layers


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


def _blocks(prefix: str, *leaves: str) -> set[str]:
    """``prefix.<i>.<leaf>`` for both layers of a tiny model."""
    return {f"{prefix}.{i}.{leaf}" for i in (0, 1) for leaf in leaves}


BERT_BLOCK = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
# family -> (what `auto` resolves to, the exact layers it wraps): every attention projection
# and feed-forward layer (and the pooler's dense, which BERT's `dense` has always included).
AUTO = {
    "bert": (
        ["query", "key", "value", "dense"],
        _blocks("bert.encoder.layer", *BERT_BLOCK) | {"bert.pooler.dense"},
    ),
    "roberta": (["query", "key", "value", "dense"], _blocks("roberta.encoder.layer", *BERT_BLOCK)),
    "electra": (["query", "key", "value", "dense"], _blocks("electra.encoder.layer", *BERT_BLOCK)),
    "distilbert": (
        ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
        _blocks(
            "distilbert.transformer.layer",
            *(f"attention.{x}" for x in ("q_lin", "k_lin", "v_lin", "out_lin")),
            "ffn.lin1",
            "ffn.lin2",
        ),
    ),
    "deberta-v2": (
        ["query_proj", "key_proj", "value_proj", "dense"],
        _blocks(
            "deberta.encoder.layer",
            *(f"attention.self.{x}" for x in ("query_proj", "key_proj", "value_proj")),
            *BERT_BLOCK[3:],
        )
        | {"pooler.dense"},
    ),
    "mpnet": (
        ["q", "k", "v", "o", "dense"],
        _blocks(
            "mpnet.encoder.layer",
            *(f"attention.attn.{x}" for x in "qkvo"),
            "intermediate.dense",
            "output.dense",
        ),
    ),
    # Decoders: attention and the feed-forward too (DESIGN.md's lists stop at attention).
    "gpt2": (
        ["c_attn", "c_proj", "c_fc"],
        _blocks("transformer.h", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    ),
    "llama": (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        _blocks(
            "model.layers",
            *(f"self_attn.{x}_proj" for x in "qkvo"),
            *(f"mlp.{x}_proj" for x in ("gate", "up", "down")),
        ),
    ),
}


def _peft_equals_ours(model: torch.nn.Module, family: str, adapter: Path, peft) -> None:  # noqa: ANN001
    """PEFT loads ``adapter`` onto a fresh base, onto the layers ``model`` wraps, with ``model``'s
    logits and no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(Unexpected|upgrade).*")
        theirs = peft.PeftModel.from_pretrained(make_model(family), adapter).eval()
    layers = {
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert layers == {n for n, _ in lora_layers(model)}
    batch = make_batch()
    torch.testing.assert_close(
        _logits(theirs, batch), _logits(model.eval(), batch), atol=1e-5, rtol=1e-5
    )


def _trained(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """LoRA A, B and the head moved off their init, as training would."""
    mark_only_lora_as_trainable(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _saved_targets(path: Path) -> list[str]:
    return json.loads((path / "adapter_config.json").read_text())["target_modules"]


@pytest.mark.parametrize("family", sorted(AUTO))
def test_auto_wraps_attention_and_feedforward_as_peft_does(
    tmp_path: Path,
    family: str,
    peft,  # noqa: ANN001
) -> None:
    names, layers = AUTO[family]
    model = make_model(family)
    assert set(apply_lora_to_model(model, "auto", rank=4, alpha=8)) == layers
    assert set(apply_lora_to_model(make_model(family), "all-linear")) == layers  # nothing missed
    save_adapter(_trained(model), tmp_path / "a")
    assert _saved_targets(tmp_path / "a") == sorted(names)  # the family's own names
    _peft_equals_ours(model, family, tmp_path / "a", peft)


def test_the_more_families_targets_are_what_auto_resolves() -> None:
    for family, (_, targets) in MORE_FAMILIES.items():
        assert targets == AUTO[family][0]


@pytest.mark.parametrize(
    ("family", "listed", "leaves"),
    [
        ("mpnet", ["query", "value"], ("attention.attn.q", "attention.attn.v")),
        ("mpnet", ["attention.output.dense"], ("attention.attn.o",)),
        ("mpnet", ["output.dense"], ("attention.attn.o", "output.dense")),
        ("mpnet", ["intermediate.dense"], ("intermediate.dense",)),  # spelled as in BERT
        (
            "distilbert",
            ["key", "output.dense"],
            ("attention.k_lin", "attention.out_lin", "ffn.lin2"),
        ),
        (
            "deberta-v2",
            ["query", "value"],
            ("attention.self.query_proj", "attention.self.value_proj"),
        ),
        ("bert", ["query", "value"], ("attention.self.query", "attention.self.value")),
    ],
)
def test_the_notes_names_map_to_the_familys(
    family: str, listed: list[str], leaves: tuple[str, ...]
) -> None:
    prefix = {"distilbert": "distilbert.transformer.layer"}.get(
        family, f"{family.split('-')[0]}.encoder.layer"
    )
    assert set(apply_lora_to_model(make_model(family), listed)) == _blocks(prefix, *leaves)


def test_the_notes_default_on_mpnet_reaches_attention_and_saves_mpnets_names(
    tmp_path: Path,
    peft,  # noqa: ANN001
) -> None:
    model = make_model("mpnet")
    wrapped = apply_lora_to_model(model, ["query", "key", "value", "dense"], rank=4, alpha=8)
    assert set(wrapped) == AUTO["mpnet"][1]
    save_adapter(_trained(model), tmp_path / "a")
    assert _saved_targets(tmp_path / "a") == ["dense", "k", "o", "q", "v"]
    _peft_equals_ours(model, "mpnet", tmp_path / "a", peft)


@pytest.mark.parametrize(
    ("family", "listed", "message"),
    [
        ("mpnet", ["query_proj", "value_proj", "dense"], "query_proj, value_proj .* q, k, v, o:"),
        ("mpnet", ["q_lin", "v_lin", "intermediate.dense"], "q_lin, v_lin .* q, k, v, o:"),
        ("bert", ["q", "v", "dense"], "q, v .* query, key, value, attention.output.dense:"),
        ("deberta-v2", ["q_proj", "dense"], "q_proj .* query_proj, key_proj, value_proj"),
    ],
)
def test_names_missing_beside_unwrapped_attention_are_refused(
    family: str, listed: list[str], message: str
) -> None:
    model = make_model(family)
    with pytest.raises(LoraKitError, match=f"target_modules {message}") as error:
        apply_lora_to_model(model, listed)
    assert "\n" not in str(error.value)
    assert not list(lora_layers(model))  # refused before any layer changed


def test_deliberate_subsets_and_zero_matches_behave_as_before() -> None:
    # Every name matches: a chosen subset, feed-forward only included, is the user's to make.
    ffn = apply_lora_to_model(make_model("mpnet"), ["intermediate.dense", "output.dense"])
    assert len(ffn) == 6  # intermediate.dense, output.dense and (via output.dense) attn.o
    # A name of another family beside a list that covers attention: one list for many families.
    assert len(apply_lora_to_model(make_model("bert"), [*AUTO["bert"][0], "q_lin"])) == 13
    with pytest.raises(LoraKitError, match=r"matched no layer.*\bq\b"):
        apply_lora_to_model(make_model("mpnet"), ["q_proj"])  # nothing at all: as before
    with pytest.raises(LoraKitError, match="auto knows the model types bert.*not None"):
        apply_lora_to_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), "auto")


def test_auto_from_the_config_and_the_flag_reaches_injection() -> None:
    for value in ("auto", ["auto"]):
        config = load_config(None, {"lora.target_modules": value})
        assert config.lora.target_modules == "auto"
    wrapped = apply_lora_to_model(make_model("mpnet"), config.lora.target_modules)
    assert set(wrapped) == AUTO["mpnet"][1]
    with pytest.raises(LoraKitError, match="auto stands alone"):
        load_config(None, {"lora.target_modules": "auto,query"})


def test_ia3_spells_targets_and_feedforward_for_the_family() -> None:
    model = make_model("mpnet")
    wrapped = apply_ia3_to_model(model)  # PEFT's BERT default: key, value, output.dense
    leaves = ("attention.attn.k", "attention.attn.v", "attention.attn.o", "output.dense")
    assert set(wrapped) == _blocks("mpnet.encoder.layer", *leaves)
    feedforward = {n for n, layer in lora_layers(model) if layer.lora.feedforward}
    assert feedforward == _blocks("mpnet.encoder.layer", "attention.attn.o", "output.dense")
