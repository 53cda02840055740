"""Reading texts from a file: .txt (one text a line), .tsv, .csv (with a header) or .jsonl rows.

Reading is lenient: a row that cannot be used (undecodable bytes, bad JSON, a missing column,
empty text) becomes a ``path:line: reason`` problem and is skipped; the good rows are still
used. Only a file that cannot be read at all, or has none of the text columns, is an error.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LoraKitError

SUFFIXES = (".txt", ".tsv", ".csv", ".jsonl")
BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of undecodable bytes
Row = tuple[int, dict[str, Any] | str]  # (first line number, a row or a problem)


@dataclass
class FileRows:
    lines: list[int] = field(default_factory=list)  # line number of each good row
    texts: list[tuple[str, ...]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "path:line: reason", skipped rows


TXT_COLUMNS = ("text", "text_pair")


def _text_rows(path: Path, text: str, width: int) -> Iterator[Row]:
    """(line, row) or (line, problem) for every non-blank record of the file's ``text``."""
    suffix = path.suffix.lower()
    lines = text.splitlines(keepends=True)
    if suffix == ".txt":
        for n, line in enumerate(lines, 1):
            parts = line.rstrip("\r\n").split("\t", width - 1)
            if not line.strip():
                continue
            if len(parts) < width:
                yield n, "needs two texts separated by a tab"
            else:
                yield n, dict(zip(TXT_COLUMNS, parts, strict=False))
    elif suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, f"not valid JSON ({e.msg})"
                continue
            yield n, row if isinstance(row, dict) else "not a JSON object"
    else:
        # GLUE's .tsv files are unquoted: a quote character is part of the text.
        if suffix == ".tsv":
            reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(lines)
        yield from _csv_rows(reader)


def _csv_rows(reader: Any) -> Iterator[Row]:
    header: list[str] | None = None
    start = 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, f"unreadable row ({e})"
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(v.strip() for v in values):
            continue
        if header is None:
            header = values
        elif len(values) != len(header):
            yield line, f"has {len(values)} fields, the header has {len(header)}"
        else:
            yield line, dict(zip(header, values, strict=True))


def _pick_columns(
    keys: Sequence[str], wanted: Sequence[str] | None, default: Sequence[str], path: Path
) -> tuple[str, ...]:
    """The columns to read: ``wanted``, else the model's, else the usual names."""
    if wanted and len(wanted) != len(default):
        raise LoraKitError(
            f"the model reads {len(default)} text column(s), --text_columns gives {len(wanted)}"
        )
    options = [wanted] if wanted else [default]
    if not wanted:
        usual = [("sentence1", "sentence2"), ("text", "text_pair"), ("sentence",), ("text",)]
        options += [o for o in usual if len(o) == len(default)]
    for option in options:
        if all(c in keys for c in option):
            return tuple(option)
    raise LoraKitError(
        f"{path}: no column {' / '.join(repr(c) for c in (wanted or default))} "
        f"(has: {', '.join(keys)}); pass --text_columns"
    )


def read_texts(
    path: Path, default: Sequence[str], columns: Sequence[str] | None = None
) -> FileRows:
    """The usable rows of ``path``, with one text per column of ``default`` (the model's).

    A .txt line holds one text, or two separated by a tab for pair tasks; other files hold
    named columns: ``columns`` if given, else ``default``, else ``sentence``/``text``.
    """
    if path.suffix.lower() not in SUFFIXES:
        raise LoraKitError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except OSError as e:
        raise LoraKitError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix.lower() == ".txt":
        columns = TXT_COLUMNS[: len(default)]
    rows = list(_text_rows(path, text.removeprefix("\ufeff"), len(default)))
    keys = list(dict.fromkeys(k for _, row in rows if isinstance(row, dict) for k in row))
    chosen = _pick_columns(keys, columns, default, path) if keys else ()
    out = FileRows()
    for n, row in rows:
        problem, texts = (row, ()) if isinstance(row, str) else _check_row(row, chosen)
        if problem is None:
            out.lines.append(n)
            out.texts.append(texts)
        else:
            out.problems.append(f"{path}:{n}: {problem}, skipped")
    return out


def _check_row(row: dict[str, Any], columns: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """(problem or None, the row's texts)."""
    values = []
    for c in columns:
        value = row.get(c)
        name = f"column {c!r}"
        if value is None:
            return f"{name} is missing", ()
        if not isinstance(value, str):
            return f"{name} is not a string", ()
        if BAD_BYTES.search(value):
            return "not UTF-8 (undecodable bytes)", ()
        if not value.strip():
            return f"{name} is empty", ()
        values.append(value)
    return None, tuple(values)
