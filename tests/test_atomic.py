"""Atomic writes: a writer killed at any step leaves a complete copy that the next run recovers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorakit.atomic import atomic_dir, atomic_file, recover

STEPS = ["filling", "written", "between renames", "before cleanup"]

WRITER = """
import os, signal, sys
from pathlib import Path
import lorakit.atomic as atomic

dst, kill_at = Path(sys.argv[1]), sys.argv[2]

def crash(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

atomic._crash_point = crash
with atomic.atomic_dir(dst) as tmp:
    (tmp / "a.txt").write_text("new")
    crash("filling")
    (tmp / "b.txt").write_text("new")
"""


def _complete(path: Path) -> str:
    """The version of a directory that has both files with the same content."""
    a, b = (path / "a.txt").read_text(), (path / "b.txt").read_text()
    assert a == b, f"a mix of versions: {a} / {b}"
    return a


@pytest.mark.parametrize("step", STEPS)
def test_writer_killed_at_each_step_leaves_a_complete_copy(tmp_path: Path, step: str) -> None:
    dst = tmp_path / "best"
    dst.mkdir()
    (dst / "a.txt").write_text("old")
    (dst / "b.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(WRITER), str(dst), step])
    assert proc.returncode == -9  # it really was killed there
    survivors = [p for p in (dst, dst.with_name(".best.old")) if p.is_dir()]
    assert survivors, "no complete copy left on disk"
    for p in survivors:
        assert _complete(p) in ("old", "new")
    recover(dst)
    expected = "new" if step == "before cleanup" else "old"
    assert _complete(dst) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # nothing left behind


def test_failed_write_keeps_the_old_copy(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with atomic_dir(dst) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(dst) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("disk full")
    assert (dst / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    dst = tmp_path / "summary.json"
    dst.write_text("old")
    with pytest.raises(ValueError), atomic_file(dst) as tmp:
        tmp.write_text("half")
        raise ValueError
    assert dst.read_text() == "old"
    with atomic_file(dst) as tmp:
        tmp.write_text("new")
    assert dst.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_reading_an_adapter_reads_the_aside_copy_and_writes_nothing(tmp_path: Path) -> None:
    from conftest import make_model

    from lorakit import apply_lora_to_model, load_adapter, save_adapter

    model = make_model("bert")
    apply_lora_to_model(model, ["query"], rank=2, alpha=2)
    save_adapter(model, tmp_path / "best")
    (tmp_path / "best").rename(tmp_path / ".best.old")  # as a kill between the renames leaves it
    before = sorted(p.name for p in tmp_path.iterdir())
    load_adapter(make_model("bert"), tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # a reader repairs nothing
    assert recover(tmp_path / "best")  # a writer, at its start, does
    assert (tmp_path / "best" / "adapter_config.json").is_file()


def test_a_writer_leaves_a_live_writers_swap_alone(tmp_path: Path) -> None:
    """Another process mid-swap (its temporary named with its PID) is not disturbed."""
    dst = tmp_path / "best"
    old = tmp_path / ".best.old"
    old.mkdir()
    (old / "a.txt").write_text("old")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".best.tmp.{other.pid}.abcd"
        live.mkdir()
        assert recover(dst) is False
        assert old.is_dir() and live.is_dir() and not dst.exists()
    finally:
        other.kill()
        other.wait()
    assert recover(dst) is True  # its writer is gone: the aside copy goes back, the temp away
    assert (dst / "a.txt").read_text() == "old" and not live.exists() and not old.exists()


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_outputs_get_the_modes_of_an_ordinary_write(
    tmp_path: Path, umask: int, file_mode: int, dir_mode: int
) -> None:
    from conftest import make_model

    from lorakit import apply_lora_to_model, save_adapter
    from lorakit.atomic import write_text

    previous = os.umask(umask)
    try:
        model = make_model("bert")
        apply_lora_to_model(model, ["query"], rank=2, alpha=2)
        save_adapter(model, tmp_path / "best")
        write_text(tmp_path / "summary.json", "{}")
        with atomic_file(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"graph")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "best").stat().st_mode) == dir_mode
    for path in [
        *(tmp_path / "best").iterdir(),
        tmp_path / "summary.json",
        tmp_path / "model.onnx",
    ]:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path


def test_contents_and_renames_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.atomic as atomic

    synced: list[str] = []
    real = atomic._fsync
    monkeypatch.setattr(atomic, "_fsync", lambda p: (synced.append(Path(p).name), real(p)))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        tmp_name = tmp.name
    assert synced == ["a.txt", tmp_name, tmp_path.name]  # file, directory, then the rename
    synced.clear()
    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
        tmp_name = tmp.name
    assert synced == [tmp_name, tmp_path.name]
