"""Atomic writes: a directory or file appears complete at its path, or not at all.

Every output lorakit writes (adapters, checkpoints, merged models, ONNX files, summaries) goes
through this module. A directory is built under a temporary name beside its destination, then
swapped in with two renames::

    dst -> .dst.old             (the previous copy, still complete)
    .dst.tmp.PID.XXXX -> dst    (the new copy, complete)
    rm -r .dst.old

A kill between any two steps leaves a complete copy on disk: before the first rename the old
``dst``, between the renames ``.dst.old``, after the second the new ``dst``. Contents are
fsynced before the renames and the parent directory after them, so this holds across a power
cut too. Outputs get the modes an ordinary write gives under the user's umask (0644 files and
0755 directories under 022), not the private modes of ``tempfile``.

Only writers repair: ``recover(dst)``, called by a writer before it starts, puts ``.dst.old``
back when ``dst`` is missing and removes temporaries whose writer is gone (the PID in their
name is not a live process); it leaves everything alone while another live writer's temporary
is there. Readers call ``readable(dst)``, which names the aside copy when only it exists, and
write nothing. One writer per destination at a time.
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


def _writer_alive(tmp: Path, dst: Path) -> bool:
    """Whether the process named in ``tmp`` (``.dst.tmp.PID.XXXX``) still runs (not us)."""
    pid = tmp.name.removeprefix(f".{dst.name}.tmp.").split(".", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False  # an older lorakit's temporary, or our own leftover: stale
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def recover(dst: str | Path) -> bool:
    """For a writer about to write ``dst``: finish or undo a swap a crash interrupted, and
    clear dead writers' temporaries; return True when ``dst`` was put back. Does nothing
    while another live writer's temporary exists (it may be mid-swap)."""
    dst = Path(dst)
    temps = _temps(dst)
    if any(_writer_alive(t, dst) for t in temps):
        return False
    old = _old(dst)
    restored = False
    if old.exists():
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)  # the swap had finished
        else:
            os.rename(old, dst)  # the crash fell between the two renames
            restored = True
    for tmp in temps:  # a writer that never reached its first rename
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return restored


def readable(dst: str | Path) -> Path:
    """Where to read ``dst``: itself, or its complete aside copy ``.dst.old`` when a swap was
    interrupted between its two renames. Writes nothing (see ``recover``)."""
    dst = Path(dst)
    old = _old(dst)
    return old if not dst.exists() and old.is_dir() else dst


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back (not thread-safe, hence last)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_tree(root: Path) -> None:
    """Give every file and directory under ``root`` the umask's ordinary mode (libraries such
    as safetensors write theirs 0600), then fsync them, deepest first, ``root`` last."""
    umask = _umask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~umask)
                _fsync(Path(path))
        os.chmod(folder, 0o777 & ~umask)
        _fsync(Path(folder))


def sync_dir(path: Path) -> None:
    """fsync a directory, so that the renames in it reach the disk."""
    _fsync(path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory ``src`` to ``dst``, replacing any ``dst`` (see above)."""
    old = _old(dst)
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.rename(dst, old)
        _crash_point("between renames")
    os.rename(src, dst)
    _fsync(dst.parent)  # both renames reach the disk
    _crash_point("before cleanup")
    shutil.rmtree(old, ignore_errors=True)


def _temp_prefix(dst: Path) -> str:
    return f".{dst.name}.tmp.{os.getpid()}."


@contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield an empty directory to fill; on success it replaces ``dst``, on error it vanishes."""
    dst = Path(dst)
    recover(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst), dir=dst.parent))
    try:
        yield tmp
        finish_tree(tmp)  # mkdtemp's 0700 would outlive the rename
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
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(dst), dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
        yield tmp
        if tmp.is_file():
            _fsync(tmp)
        _crash_point("written")
        os.replace(tmp, dst)
        _fsync(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(dst: str | Path, text: str) -> None:
    """``Path.write_text``, atomically."""
    with atomic_file(dst) as tmp:
        tmp.write_text(text, encoding="utf-8")
