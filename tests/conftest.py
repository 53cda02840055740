"""Tiny models built from configs, so the suite runs offline in seconds."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    RobertaConfig,
)

# family -> (config, LoRA targets from DESIGN.md)
FAMILIES: dict[str, tuple[PretrainedConfig, list[str]]] = {
    "bert": (
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
        ),
        ["query", "key", "value", "dense"],
    ),
    "roberta": (
        RobertaConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=70,
            num_labels=3,
            pad_token_id=1,
        ),
        ["query", "key", "value", "dense"],
    ),
    "distilbert": (
        DistilBertConfig(
            vocab_size=100,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=64,
            num_labels=2,
        ),
        ["q_lin", "k_lin", "v_lin", "out_lin"],
    ),
    "gpt2": (
        GPT2Config(
            vocab_size=100,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            num_labels=2,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
        ),
        ["c_attn", "c_proj"],
    ),
    "llama": (
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
            pad_token_id=0,
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
}


def make_model(family: str = "bert", seed: int = 0) -> torch.nn.Module:
    config, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    return model.eval()


def make_batch(seed: int = 1, batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param
