"""Runtime choices: precision names and the autocast dtypes they mean; the thread governor."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from lorakit import runtime
from lorakit.errors import LoraKitError
from lorakit.runtime import amp_dtype


def test_precision_names_map_to_autocast_dtypes() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype("fp32", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("fp16", cpu) is torch.float16
    with pytest.raises(LoraKitError, match="precision must be"):
        amp_dtype("fp8", cpu)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _FakeCpu:
    """/proc/stat's busy/total ticks and this process's CPU time, moved by hand."""

    def __init__(self) -> None:
        self.busy, self.total, self.own, self.now = 0, 0, 0.0, 0.0

    def advance(self, seconds: float, cpus: int, others: float, own: float) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        self.now += seconds
        self.total += round(seconds * tick * cpus)
        self.busy += round(seconds * tick * (others + own))
        self.own += seconds * own


@pytest.mark.usefixtures("restore_threads")
def test_governor_gives_other_processes_their_cores_and_takes_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeCpu()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LORAKIT_THREADS", raising=False)
    monkeypatch.setattr(runtime, "_cpu_ticks", lambda cpus: (fake.busy, fake.total))
    monkeypatch.setattr(runtime.time, "monotonic", lambda: fake.now)
    monkeypatch.setattr(os, "times", lambda: SimpleNamespace(user=fake.own, system=0.0))
    torch.set_num_threads(4)
    gov = runtime.ThreadGovernor(interval=2.0)
    gov.cpus = [0, 1, 2, 3]
    assert gov.adaptive and gov.max_threads == 4
    fake.advance(1.0, 4, others=3.0, own=1.0)
    assert gov.poll() == 4  # too soon to measure: nothing changes
    fake.advance(1.5, 4, others=3.0, own=1.0)
    assert gov.poll() == 1  # three cores busy elsewhere: one thread
    fake.advance(2.5, 4, others=1.2, own=1.0)
    assert gov.poll() == 3
    fake.advance(2.5, 4, others=0.3, own=3.0)
    assert gov.poll() == 4  # never more than it started with
    assert gov.changes == 3


@pytest.mark.usefixtures("restore_threads")
def test_governor_is_fixed_when_the_user_sets_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_THREADS", "1")
    gov = runtime.ThreadGovernor(interval=0.0)
    assert not gov.adaptive and torch.get_num_threads() == 1
    assert gov.describe() == "1 thread"
    monkeypatch.delenv("LORAKIT_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert not runtime.ThreadGovernor(interval=0.0).adaptive
    for bad in ("0", "two", "-3"):
        monkeypatch.setenv("LORAKIT_THREADS", bad)
        with pytest.raises(LoraKitError, match="LORAKIT_THREADS must be a positive whole number"):
            runtime.ThreadGovernor(interval=0.0)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
@pytest.mark.usefixtures("restore_threads")
def test_governor_sees_a_real_busy_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LORAKIT_THREADS", raising=False)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    gov = runtime.ThreadGovernor(interval=1.0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.2)
        others = gov.others()
    finally:
        busy.kill()
        busy.wait()
    assert others is not None and others > 0.6  # the busy loop's core (plus any steal)
