"""Data: GLUE tasks (from a data directory or ``datasets``), your own CSV/TSV/JSONL files.

Rows become ``Examples`` (texts + integer labels), tokenized once into ``Encoded`` id arrays;
``batches`` cuts them into padded tensors, grouping similar lengths to waste little padding.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lorakit.config import DataSettings
from lorakit.errors import LoraKitError

Metric = Literal["accuracy", "f1", "matthews"]
DEFAULT_MAX_LENGTH = 128  # tokens per text when an adapter does not say
# The dev set's rows depend on this and the data only: every seed of a sweep (whose training
# seed changes dropout, order and init) is chosen on the same held-out rows.
DEV_SEED = 20240229


@dataclass(frozen=True)
class TaskSpec:
    text_columns: tuple[str, ...]
    labels: tuple[str, ...]
    metric: Metric = "accuracy"
    validation_split: str = "validation"


GLUE_TASKS = {
    "cola": TaskSpec(("sentence",), ("unacceptable", "acceptable"), "matthews"),
    "sst2": TaskSpec(("sentence",), ("negative", "positive")),
    "mrpc": TaskSpec(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1"),
    "qqp": TaskSpec(("question1", "question2"), ("not_duplicate", "duplicate"), "f1"),
    "qnli": TaskSpec(("question", "sentence"), ("entailment", "not_entailment")),
    "rte": TaskSpec(("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "mnli": TaskSpec(
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        validation_split="validation_matched",
    ),
    "wnli": TaskSpec(("sentence1", "sentence2"), ("not_entailment", "entailment")),
}


@dataclass
class Examples:
    texts: list[tuple[str, ...]]  # one or two texts per example
    labels: list[int]
    label_names: tuple[str, ...]
    text_columns: tuple[str, ...]
    metric: Metric = "accuracy"

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> Examples:
        if n <= 0 or n >= len(self):
            return self
        return Examples(
            self.texts[:n], self.labels[:n], self.label_names, self.text_columns, self.metric
        )

    def take(self, idx: Sequence[int] | np.ndarray) -> Examples:
        return Examples(
            [self.texts[i] for i in idx],
            [self.labels[i] for i in idx],
            self.label_names,
            self.text_columns,
            self.metric,
        )


def hold_out(examples: Examples, size: float) -> tuple[Examples, Examples]:
    """Split off a dev set: ``size`` rows (``>= 1``) or that fraction (``< 1``) of them.

    The dev rows are a seeded random draw (``DEV_SEED``, not the training seed); the training
    rows keep their file order, so ``head(n)`` afterwards still takes the first rows.
    """
    n = len(examples)
    count = int(size) if size >= 1 else round(size * n)
    if not 1 <= count < n:
        raise LoraKitError(
            f"dev_split {size:g} leaves no dev or no training rows of the {n:,} training rows"
        )
    dev = np.sort(np.random.default_rng(DEV_SEED).permutation(n)[:count])
    keep = np.setdiff1d(np.arange(n), dev, assume_unique=True)
    return examples.take(keep), examples.take(dev)


def data_dir(settings: DataSettings) -> Path | None:
    value = settings.data_dir or os.environ.get("LORAKIT_DATA_DIR", "")
    return Path(value) if value else None


def load_examples(
    settings: DataSettings,
    split: Literal["train", "validation"],
    label_names: Sequence[str] | None = None,
) -> Examples:
    """The rows of one split, from your own file, a GLUE data directory, or ``datasets``."""
    own_file = settings.train_file if split == "train" else settings.validation_file
    if settings.dataset == "csv" or own_file:
        if not own_file:
            raise LoraKitError(f"dataset 'csv' needs --{split}_file")
        return read_file(Path(own_file), settings.text_columns, settings.label_column, label_names)
    task = settings.subset
    if task not in GLUE_TASKS:
        raise LoraKitError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}")
    spec = GLUE_TASKS[task]
    split_name = spec.validation_split if split == "validation" else split
    folder = data_dir(settings)
    if folder is not None:
        path = folder / task / f"{split_name}.tsv"
        if not path.is_file():
            raise LoraKitError(f"{path} does not exist (data_dir holds <task>/<split>.tsv)")
        examples = read_file(path, list(spec.text_columns), "label", spec.labels)
    else:
        examples = _load_glue_hub(task, split_name, spec)
    examples.metric = spec.metric
    return examples


def _load_glue_hub(task: str, split: str, spec: TaskSpec) -> Examples:
    import datasets

    try:
        ds = datasets.load_dataset("glue", task, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "no network"
        raise LoraKitError(
            f"cannot load GLUE {task}/{split} with datasets ({type(e).__name__}); "
            "pass --data_dir or set LORAKIT_DATA_DIR to a folder holding <task>/<split>.tsv"
        ) from None
    texts = list(zip(*(ds[c] for c in spec.text_columns), strict=True))
    return Examples(texts, list(ds["label"]), spec.labels, spec.text_columns, spec.metric)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    """(line number, row) for a .csv, .tsv (no quoting, as GLUE) or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json"):
        raise LoraKitError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            if suffix in (".jsonl", ".json"):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise LoraKitError(f"{path}:{n}: not a JSON object") from None
                    if not isinstance(row, dict):
                        raise LoraKitError(f"{path}:{n}: not a JSON object")
                    yield n, row
                return
            if suffix == ".tsv":
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, dict(row)
    except UnicodeDecodeError as e:
        raise LoraKitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LoraKitError(f"cannot read {path}: {e.strerror}") from None


def read_file(
    path: Path,
    text_columns: Sequence[str],
    label_column: str,
    label_names: Sequence[str] | None = None,
) -> Examples:
    """Read labelled rows; string labels become ids (sorted names unless ``label_names`` given)."""
    if not path.is_file():
        raise LoraKitError(f"data file {path} does not exist")
    texts: list[tuple[str, ...]] = []
    raw_labels: list[tuple[int, str]] = []
    columns: list[str] = list(text_columns)
    for n, row in _rows(path):
        if not columns:
            columns = [c for c in ["sentence", "text"] if c in row][:1]
            if not columns:
                raise LoraKitError(f"{path}: no 'sentence' or 'text' column; pass --text_columns")
        for c in [*columns, label_column]:
            if row.get(c) is None:
                raise LoraKitError(f"{path}:{n}: column {c!r} is missing (has: {', '.join(row)})")
        texts.append(tuple(str(row[c]) for c in columns))
        raw_labels.append((n, str(row[label_column]).strip()))
    if not texts:
        raise LoraKitError(f"{path} holds no rows")
    names = tuple(label_names) if label_names else _label_names([v for _, v in raw_labels])
    labels = [_label_id(v, names, path, n) for n, v in raw_labels]
    return Examples(texts, labels, names, tuple(columns))


def _label_names(values: list[str]) -> tuple[str, ...]:
    """Integer labels from 0 name themselves ("0".."max"); anything else sorts as strings."""
    unique = sorted(set(values))
    if all(v.isdigit() for v in unique) and min(int(v) for v in unique) == 0:
        return tuple(str(i) for i in range(max(int(v) for v in unique) + 1))
    return tuple(unique)


def _label_id(value: str, names: tuple[str, ...], path: Path, line: int) -> int:
    if value in names:
        return names.index(value)
    if value.isdigit() and int(value) < len(names):
        return int(value)
    raise LoraKitError(f"{path}:{line}: unknown label {value!r} (labels: {', '.join(names)})")


@dataclass
class Encoded:
    """Token ids of every example, tokenized once."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    lengths: np.ndarray
    pad_id: int
    truncated: np.ndarray  # bool per example: cut at max_length

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Encoded:
        """The examples ``idx``, in that order."""
        types = self.token_type_ids
        return Encoded(
            input_ids=[self.input_ids[i] for i in idx],
            token_type_ids=[types[i] for i in idx] if types is not None else None,
            labels=self.labels[idx],
            lengths=self.lengths[idx],
            pad_id=self.pad_id,
            truncated=self.truncated[idx],
        )


def _tokenize(
    rows: Sequence[tuple[str, ...]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[bool]]:
    """ids, token type ids and truncation flags of rows that all have the same arity."""
    columns = list(zip(*rows, strict=True))
    out = tokenizer(*columns, truncation=True, max_length=max_length)
    ids = [np.asarray(x, dtype=np.int64) for x in out["input_ids"]]
    if out.encodings is not None:  # fast tokenizers keep what truncation cut off
        truncated = [bool(e.overflowing) for e in out.encodings]
    else:
        truncated = [len(f) > max_length for f in tokenizer(*columns)["input_ids"]]
    types = out.get("token_type_ids")
    return ids, [np.asarray(t, dtype=np.int64) for t in types] if types else None, truncated


def encode_texts(
    rows: Sequence[tuple[str, ...]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    labels: Sequence[int] | None = None,
    pad_id: int | None = None,
) -> Encoded:
    """Token ids of one or two texts per row (both kinds may mix), cut at ``max_length``;
    notes which rows were cut."""
    n = len(rows)
    ids: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n
    types: list[np.ndarray] | None = None
    truncated = [False] * n
    for arity in sorted({len(r) for r in rows}):
        idx = [i for i, r in enumerate(rows) if len(r) == arity]
        part_ids, part_types, part_cut = _tokenize([rows[i] for i in idx], tokenizer, max_length)
        if part_types is not None and types is None:
            types = [np.zeros(0, dtype=np.int64)] * n
        for j, i in enumerate(idx):
            ids[i], truncated[i] = part_ids[j], part_cut[j]
            if types is not None:
                types[i] = part_types[j] if part_types else np.zeros_like(part_ids[j])
    if pad_id is None:
        pad_id = int(tokenizer.pad_token_id or 0)
    return Encoded(
        input_ids=ids,
        token_type_ids=types,
        labels=np.asarray(labels if labels is not None else [0] * n, dtype=np.int64),
        lengths=np.asarray([len(x) for x in ids], dtype=np.int64),
        pad_id=pad_id,
        truncated=np.asarray(truncated, dtype=bool),
    )


def encode(examples: Examples, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """``encode_texts`` of the examples' texts, with their labels."""
    return encode_texts(examples.texts, tokenizer, max_length, examples.labels)


def batch_order(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[np.ndarray]:
    """Shuffled batches of indices; with grouping, each batch holds neighbours in length.

    Grouping sorts shuffled chunks of 64 batches by length and shuffles the batches, so every
    epoch sees a new order but little padding (as Hugging Face's ``group_by_length``).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        chunk = batch_size * 64
        order = np.concatenate(
            [
                c[np.argsort(-lengths[c], kind="stable")]
                for c in np.split(order, range(chunk, len(order), chunk))
            ]
        )
    batches = np.split(order, range(batch_size, len(order), batch_size))
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_order(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Length-sorted batches: the least padding for inference."""
    order = np.argsort(-lengths, kind="stable")
    return np.split(order, range(batch_size, len(order), batch_size))


def collate(data: Encoded, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Pad the examples ``idx`` to their longest: input_ids, attention_mask, labels."""
    width = int(data.lengths[idx].max())
    ids = np.full((len(idx), width), data.pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    types = np.zeros((len(idx), width), dtype=np.int64) if data.token_type_ids else None
    for row, i in enumerate(idx):
        n = data.lengths[i]
        ids[row, :n] = data.input_ids[i]
        mask[row, :n] = 1
        if types is not None and data.token_type_ids is not None:
            types[row, :n] = data.token_type_ids[i]
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(data.labels[idx]),
    }
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types)
    return batch


def adapter_text_columns(config: dict[str, Any]) -> tuple[str, ...]:
    """The text columns the adapter's task reads: its GLUE task's, else saved ones, else one."""
    task = config.get("task")
    if task in GLUE_TASKS:
        return GLUE_TASKS[task].text_columns
    return tuple(config.get("text_columns") or ("sentence",))
