"""Atomic writes: a writer killed at any step leaves a complete copy that the next run recovers."""

from __future__ import annotations

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


def test_reading_an_adapter_recovers_it_after_a_crash_between_renames(tmp_path: Path) -> None:
    from conftest import make_model

    from lorakit import apply_lora_to_model, load_adapter, save_adapter

    model = make_model("bert")
    apply_lora_to_model(model, ["query"], rank=2, alpha=2)
    save_adapter(model, tmp_path / "best")
    (tmp_path / "best").rename(tmp_path / ".best.old")  # as a kill between the renames leaves it
    load_adapter(make_model("bert"), tmp_path / "best")
    assert (tmp_path / "best" / "adapter_config.json").is_file()
