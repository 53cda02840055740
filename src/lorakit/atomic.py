"""Atomic writes: a directory or file appears complete at its path, or not at all.

Every output lorakit writes (adapters, checkpoints, merged models, ONNX files, summaries) goes
through this module. A directory is built under a temporary name beside its destination, then
swapped in with two renames::

    dst -> .dst.old        (the previous copy, still complete)
    .dst.tmp.XXXX -> dst   (the new copy, complete)
    rm -r .dst.old

A kill between any two steps leaves a complete copy on disk: before the first rename the old
``dst``, between the renames ``.dst.old``, after the second the new ``dst``. ``recover(dst)``,
called before every write and every read of a directory, puts ``.dst.old`` back when ``dst`` is
missing and clears what an interrupted writer left. One writer per destination at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _crash_point(step: str) -> None:
    """A no-op between the steps of a swap; tests replace it to kill the writer there."""


def _old(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.old")


def _temps(dst: Path) -> list[Path]:
    return list(dst.parent.glob(f".{dst.name}.tmp.*")) if dst.parent.is_dir() else []


def recover(dst: str | Path) -> bool:
    """Finish or undo a swap a crash interrupted; return True when ``dst`` was put back."""
    dst = Path(dst)
    old = _old(dst)
    restored = False
    if old.exists():
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)  # the swap had finished
        else:
            os.rename(old, dst)  # the crash fell between the two renames
            restored = True
    for tmp in _temps(dst):  # a writer that never reached its first rename
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return restored


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory ``src`` to ``dst``, replacing any ``dst`` (see above)."""
    old = _old(dst)
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.rename(dst, old)
        _crash_point("between renames")
    os.rename(src, dst)
    _crash_point("before cleanup")
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield an empty directory to fill; on success it replaces ``dst``, on error it vanishes."""
    dst = Path(dst)
    recover(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp.", dir=dst.parent))
    try:
        yield tmp
        _crash_point("written")
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``dst`` in one rename."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.tmp.", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _crash_point("written")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(dst: str | Path, text: str) -> None:
    """``Path.write_text``, atomically."""
    with atomic_file(dst) as tmp:
        tmp.write_text(text, encoding="utf-8")
