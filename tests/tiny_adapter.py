"""A saved tiny base model (BERT, with a character-level tokenizer) and a LoRA adapter for it."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from conftest import FAMILIES, make_model
from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizerFast

from lorakit import apply_lora_to_model, mark_only_lora_as_trainable, save_adapter

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Every lowercase word splits into letters, so any English text tokenizes without [UNK].
WORDS = ["the", "movie", "not", "good", "bad", "great", "film", "fine"]
VOCAB = (
    SPECIAL
    + list(string.ascii_lowercase)
    + ["##" + c for c in string.ascii_lowercase]
    + list(string.digits)
    + list(".,;:!?'\"-%()")
    + WORDS
)
LABELS = {0: "negative", 1: "positive"}
PAIR_LABELS = {0: "not_equivalent", 1: "equivalent"}


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    """A BERT WordPiece tokenizer over ``VOCAB``, its vocab file written to ``folder``."""
    assert len(VOCAB) <= 100, "must fit the tiny model's vocab_size"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    vocab = {w: i for i, w in enumerate((folder / "vocab.txt").read_text().split("\n")[:-1])}
    return BertTokenizerFast(vocab=vocab)


def make_base(folder: Path, hidden: int = 32) -> Path:
    """Save a tiny BERT classifier (``hidden`` wide) and the tokenizer into ``folder``."""
    config = BertConfig.from_dict({**FAMILIES["bert"][0].to_dict(), "hidden_size": hidden})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


def make_adapter(
    folder: Path, base: Path, task: str = "sst2", max_length: int = 32, seed: int = 3
) -> Path:
    """A LoRA adapter (r=4, random nonzero B, perturbed head) for the tiny model at ``base``."""
    model = make_model("bert")
    labels = PAIR_LABELS if task == "mrpc" else LABELS
    model.config.id2label = dict(labels)
    model.config.label2id = {v: k for k, v in labels.items()}
    apply_lora_to_model(model, FAMILIES["bert"][1], rank=4, alpha=8)
    mark_only_lora_as_trainable(model)  # as training does: the adapter holds LoRA + head
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("classifier"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    extra = {"max_length": max_length, "metrics": {"accuracy": 0.5}}
    return save_adapter(model, folder, base_model_name_or_path=str(base), task=task, extra=extra)


def make_three_label_adapter(folder: Path, base: Path) -> Path:
    """Rank 2 on query/value only, three labels: another rank, target set and head width."""
    model = make_model("bert")
    model.classifier = torch.nn.Linear(32, 3)
    model.config.num_labels = 3
    model.config.id2label = {0: "low", 1: "mid", 2: "high"}
    model.config.label2id = {"low": 0, "mid": 1, "high": 2}
    apply_lora_to_model(model, ["query", "value"], rank=2, alpha=6)
    mark_only_lora_as_trainable(model)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return save_adapter(
        model, folder, base_model_name_or_path=str(base), task="grades", extra={"max_length": 32}
    )


def make_served_set(root: Path) -> dict[str, Path]:
    """The base and adapters the server tests serve: sst2 and mrpc inside ``library`` (the
    ``--adapter_dir`` runtime loads may read), a three-label adapter outside it."""
    base = make_base(root / "base")
    library = root / "library"
    return {
        "root": root,
        "base": base,
        "library": library,
        "sst2": make_adapter(library / "sst2", base),
        "mrpc": make_adapter(library / "mrpc", base, task="mrpc", seed=5),
        "grades": make_three_label_adapter(root / "grades", base),
    }
