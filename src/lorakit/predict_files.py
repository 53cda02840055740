"""Predicting a file: the good rows of it (``lorakit.textfiles``) labelled, as jsonl records.

A row that cannot be used becomes a ``path:line: reason`` problem and is skipped; the good rows
are still predicted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.atomic import atomic_file
from lorakit.errors import LoraKitError
from lorakit.predict import Predictor
from lorakit.progress import progress as progress_bar
from lorakit.textfiles import read_texts


def predict_file(
    predictor: Predictor,
    path: Path,
    columns: Sequence[str] | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Predictions for the good rows of ``path`` (as jsonl records) and the skipped rows' problems.

    Each record holds ``line``, ``text`` (and ``text_pair``), ``label``, ``score``, ``probs``
    and ``truncated``. ``progress`` shows a bar on stderr (a line every few seconds when stderr
    is not a terminal).
    """
    if not path.is_file():
        raise LoraKitError(f"input file {path} does not exist")
    rows = read_texts(path, predictor.text_columns, columns)
    with progress_bar(len(rows.texts), path.name, unit="text", disable=not progress) as bar:
        preds = predictor.predict(rows.texts, bar.update)
    records = []
    for line, texts, pred in zip(rows.lines, rows.texts, preds, strict=True):
        names = ("text", "text_pair")[: len(texts)]
        records.append({"line": line, **dict(zip(names, texts, strict=True)), **pred})
    return records, rows.problems


def write_jsonl(records: list[dict[str, Any]], out: Path) -> None:
    """Write ``records`` one JSON object a line, atomically (temp file, then rename)."""
    with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
