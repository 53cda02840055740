"""Which layers LoRA targets in each model family: ``auto``, and the learning note's names.

The learning note names BERT's layers: ``query key value dense``. Other families spell the same
layers otherwise (MPNet ``attention.attn.q``, DeBERTa-v2 ``query_proj``, DistilBERT ``q_lin``),
so on them the note's default would wrap only some feed-forward layers, or nothing. One table,
keyed by ``model.config.model_type``, spells the note's names in each family; ``auto`` is the
note's default spelled that way: every attention projection and feed-forward layer.
"""

from __future__ import annotations

from collections.abc import Sequence

AUTO = "auto"
# What `auto` means, in the note's names: q, k, v, and `dense` = the attention output
# projection and both feed-forward layers (and BERT's pooler.dense, as `dense` always has).
NOTE_DEFAULT = ("query", "key", "value", "dense")
# The attention projections, in the note's names.
NOTE_ATTENTION = ("query", "key", "value", "attention.output.dense")

# model_type -> the note's name -> this family's names for the same layers; a name the family
# spells as BERT does is left out. Keys: query, key, value, dense, and BERT's dotted suffixes
# attention.output.dense (attention output), intermediate.dense (feed-forward in) and
# output.dense (attention output and feed-forward out, as that suffix matches both in BERT).
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {},
    "roberta": {},
    "xlm-roberta": {},
    "electra": {},
    "distilbert": {
        "query": ("q_lin",),
        "key": ("k_lin",),
        "value": ("v_lin",),
        "dense": ("out_lin", "lin1", "lin2"),
        "attention.output.dense": ("out_lin",),
        "intermediate.dense": ("lin1",),
        "output.dense": ("out_lin", "lin2"),
    },
    "deberta-v2": {"query": ("query_proj",), "key": ("key_proj",), "value": ("value_proj",)},
    "mpnet": {  # attention.attn.{q,k,v,o}; intermediate.dense and output.dense as in BERT
        "query": ("q",),
        "key": ("k",),
        "value": ("v",),
        "dense": ("o", "dense"),
        "attention.output.dense": ("o",),
        "output.dense": ("o", "output.dense"),
    },
    "gpt2": {  # attn.c_attn is q, k and v in one layer; mlp.c_fc, mlp.c_proj the feed-forward
        "query": ("c_attn",),
        "key": ("c_attn",),
        "value": ("c_attn",),
        "dense": ("c_proj", "c_fc"),
        "attention.output.dense": ("attn.c_proj",),
        "intermediate.dense": ("c_fc",),
        "output.dense": ("c_proj",),
    },
    "llama": {
        "query": ("q_proj",),
        "key": ("k_proj",),
        "value": ("v_proj",),
        "dense": ("o_proj", "gate_proj", "up_proj", "down_proj"),
        "attention.output.dense": ("o_proj",),
        "intermediate.dense": ("gate_proj", "up_proj"),
        "output.dense": ("o_proj", "down_proj"),
    },
}


def family_names(model_type: str | None, names: Sequence[str]) -> list[str]:
    """``names`` with each of the note's names spelled as ``model_type`` spells it.

    Other names, and every name of a family the table does not know, stay as they are.
    """
    spelling = FAMILIES.get(model_type or "", {})
    out: list[str] = []
    for name in names:
        out += [n for n in spelling.get(name, (name,)) if n not in out]
    return out


def auto_targets(model_type: str | None) -> list[str] | None:
    """The family's attention projections and feed-forward layers; None for an unknown family."""
    return family_names(model_type, NOTE_DEFAULT) if model_type in FAMILIES else None


def attention_targets(model_type: str | None) -> list[str]:
    """The family's attention projections (q, k, v, output); empty for an unknown family."""
    return family_names(model_type, NOTE_ATTENTION) if model_type in FAMILIES else []
