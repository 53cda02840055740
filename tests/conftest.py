"""Tiny models built from configs, so the suite runs offline in seconds."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    LlamaConfig,
    MPNetConfig,
    PretrainedConfig,
    RobertaConfig,
)

# A fixed thread count for every lorakit run of the suite (subprocesses inherit it): the thread
# governor would otherwise follow the machine's load, and results computed with different
# thread counts differ in the last float bits, which the exact-resume tests compare.
os.environ.setdefault("LORAKIT_THREADS", str(torch.get_num_threads()))

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


TINY = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
# More encoder families, for the target-table tests only (not in FAMILIES: every test taking the
# `family` fixture would run on them too). Targets as `auto` resolves them.
MORE_FAMILIES: dict[str, tuple[PretrainedConfig, list[str]]] = {
    "deberta-v2": (  # shaped like deberta-v3-base: relative attention, shared position keys
        DebertaV2Config(
            **TINY,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=16,
            position_biased_input=False,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
        ),
        ["query_proj", "key_proj", "value_proj", "dense"],
    ),
    "electra": (
        ElectraConfig(
            **TINY,
            embedding_size=32,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
        ),
        ["query", "key", "value", "dense"],
    ),
    "mpnet": (
        MPNetConfig(**TINY, intermediate_size=64, max_position_embeddings=70, num_labels=2),
        ["q", "k", "v", "o", "dense"],
    ),
}


def make_model(family: str = "bert", seed: int = 0) -> torch.nn.Module:
    config, _ = FAMILIES[family] if family in FAMILIES else MORE_FAMILIES[family]
    torch.manual_seed(seed)
    # A copy: tests change their model's labels, which must not leak into the next model.
    model = AutoModelForSequenceClassification.from_config(copy.deepcopy(config))
    return model.eval()


def make_batch(seed: int = 1, batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def peft():  # noqa: ANN201 - the module
    """Hugging Face PEFT, the reference implementation; tests that take it skip without it."""
    return pytest.importorskip("peft")


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


WORDS = ["good", "great", "fun", "bad", "awful", "dull", "movie", "plot", "the", "a", "was", "is"]


def save_tiny_model_dir(path, num_labels: int = 2):  # noqa: ANN001, ANN201
    """A tiny BERT with a word-level tokenizer saved like a Hub checkpoint (offline)."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    config = BertConfig.from_dict(
        {
            **FAMILIES["bert"][0].to_dict(),
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "num_labels": num_labels,
            "initializer_range": 0.3,
        }
    )  # distinct features
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    return path


def write_sentiment_rows(path, n: int, seed: int = 0, header: str = "sentence\tlabel"):  # noqa: ANN001, ANN201
    """Learnable toy sentiment: positive words -> 1, negative words -> 0."""
    import random

    rng = random.Random(seed)
    lines = [header]
    for i in range(n):
        label = i % 2
        words = ["good", "great", "fun"] if label else ["bad", "awful", "dull"]
        filler = rng.sample(["the", "movie", "plot", "was", "is", "a"], k=rng.randint(0, 2))
        lines.append(" ".join([rng.choice(words), *filler]) + f"\t{label}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Deliver a real SIGINT (Ctrl-C) right after optimizer step ``step`` (counted from 1)."""
    from lorakit.loop import Loop

    original = Loop._optimizer_step

    def step_then_signal(self: Loop) -> None:
        original(self)
        if self.state.global_step + 1 == step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Loop, "_optimizer_step", step_then_signal)
