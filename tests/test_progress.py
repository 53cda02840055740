"""Progress: tqdm in a terminal; elsewhere a plain line every few seconds, never a '\\r'."""

from __future__ import annotations

import io
import sys

import pytest
from tqdm import tqdm

from lorakit import progress as progress_module
from lorakit.progress import LineProgress, progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_not_a_terminal_writes_a_line_every_ten_seconds(clock: Clock) -> None:
    """2,105 steps over 210 s (one SST-2 epoch at 10 steps/s): ~21 lines, not 2,105 redraws."""
    stream = io.StringIO()
    bar = progress(2105, "Epoch 1/3", stream=stream)
    assert isinstance(bar, LineProgress)
    for step in range(1, 2106):
        clock.now = 1000.0 + step / 10
        bar.update(1)
        bar.set_postfix(loss=f"{1 / step:.4f}")
    bar.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 18 <= len(lines) <= 23
    assert lines[0].startswith("Epoch 1/3: 100/2105 (5%), 10.00 it/s, elapsed 00:10, loss=")
    assert lines[-1].startswith("Epoch 1/3: 2105/2105 (100%)")


def test_short_run_writes_nothing(clock: Clock) -> None:
    stream = io.StringIO()
    with progress(50, "in.tsv", unit="text", stream=stream) as bar:
        for _ in range(50):
            clock.now += 0.01
            bar.update(1)
    assert stream.getvalue() == ""


def test_resumed_bar_counts_from_initial(clock: Clock) -> None:
    stream = io.StringIO()
    bar = progress(1000, "Epoch 2/3", initial=400, stream=stream)
    clock.now += 10
    bar.update(100)
    assert stream.getvalue().startswith("Epoch 2/3: 500/1000 (50%), 10.00 it/s")


def test_terminal_gets_tqdm() -> None:
    bar = progress(10, "x", stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()
    assert isinstance(progress(10, "x"), LineProgress)
