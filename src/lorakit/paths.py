"""Output paths, checked before any slow work: the right kind, a creatable parent, writable."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path
from typing import Literal

from lorakit.errors import LoraKitError

# OSErrors that are about a path or the disk, never a bug: the CLI prints them as one line.
PATH_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def check_writable(out: Path, kind: Literal["dir", "file"]) -> None:
    """Raise ``LoraKitError`` unless ``out`` (a directory or a file to write) can be written.

    Missing parent directories are created. Writability is probed by creating a temporary
    file, which, unlike permission bits, also holds for root and read-only file systems.
    """
    if kind == "dir" and out.exists() and not out.is_dir():
        raise LoraKitError(f"{out} is a file, not a directory")
    if kind == "file" and out.is_dir():
        raise LoraKitError(f"{out} is a directory, not a file")
    where = out if out.is_dir() else out.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (where, *where.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise LoraKitError(f"cannot create {where}: {blocker} is a file") from None
        raise LoraKitError(f"cannot create {e.filename or where}: {e.strerror}") from None
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise LoraKitError(f"{where} is not writable ({e.strerror})") from None


def os_error_message(e: OSError) -> str | None:
    """One line for an OSError about a path or the disk; None for any other OSError."""
    if e.filename is None and e.errno not in PATH_ERRNOS:
        return None
    what = e.strerror or str(e)
    if e.filename is None:
        return what
    target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    return f"{target}: {what}"
