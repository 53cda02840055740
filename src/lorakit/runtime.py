"""Device, precision, threads and memory: picking the device, knowing whether bf16 is fast here,
autocast, sharing the CPU with other processes, and the allocator settings a server needs."""

from __future__ import annotations

import functools
import math
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LoraKitError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, then Apple's MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LoraKitError(
            f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraKitError("device cuda was asked for but CUDA is not available")
    return device


FAST_BF16_ENV = "LORAKIT_FAST_BF16"  # "1"/"0": force the answer of ``bf16_fast``

# Which jobs ``--precision auto`` runs in bf16 where bf16 is fast: the ones whose measurement
# (docs/results.md, "fp32 or bf16") lost at most 0.2 accuracy points against fp32.
# Export is absent: its graph and the reference it is checked against are fp32 by design.
AUTO_BF16_JOBS = frozenset({"train", "eval", "predict", "serve"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(text.split())


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16).

    ``LORAKIT_FAST_BF16=1`` (or ``0``) overrides the CPU's flags: it lets one machine behave,
    for the precision decision, like the other kind (the test suite runs both ways).
    """
    import os

    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise LoraKitError(f"{FAST_BF16_ENV} must be 1 or 0, not {forced!r}")
        return forced == "1"
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def amp_dtype(precision: str, device: torch.device, job: str = "train") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 for the jobs in ``AUTO_BF16_JOBS`` where ``bf16_fast``, else fp32.
    """
    if precision == "auto":
        return torch.bfloat16 if job in AUTO_BF16_JOBS and bf16_fast(device) else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    raise LoraKitError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")


def precision_name(dtype: torch.dtype | None) -> str:
    """What ran, as the flags spell it: fp32, bf16 or fp16."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
SERVE_MMAP_THRESHOLD = 4 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library if it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and others
        return None


def pin_mmap_threshold(size: int = SERVE_MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold so that blocks of ``size`` bytes or more (a batch's
    activations) are mapped on allocation and returned to the system when freed.

    glibc raises the threshold each time such a block is freed, after which activations of
    ever-changing batch shapes come from the heap and fragment it: a server's memory then grows
    with every new shape. Does nothing (False) off glibc or when ``MALLOC_MMAP_THRESHOLD_``
    is set in the environment (the user's choice wins).
    """
    import os

    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, size))


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``); False off glibc.

    Freed activations of past batches otherwise stay in the process as free heap pages,
    scattered between live blocks where the heap cannot shrink past them.
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


class ThreadGovernor:
    """Keeps torch's CPU threads at the cores that other processes leave free.

    Two torch processes on 2 cores, each with 2 threads, slow each other up to 30x: a thread
    that reaches OpenMP's barrier spin-waits for its partner, which another process has
    descheduled (docs/benchmarks-log.md, shared machines). Every ``interval`` seconds ``poll``
    measures, from ``/proc/stat`` and this process's own CPU time, how many of our cores other
    processes (and the hypervisor's steal) kept busy, and sets the thread count to the rest
    (at least 1, at most the count it started with). Alone it changes nothing.

    Fixed (never adapts) when ``LORAKIT_THREADS`` or ``OMP_NUM_THREADS`` is set, and off Linux.
    """

    def __init__(self, interval: float = 2.0) -> None:
        import os

        self.interval = interval
        fixed = os.environ.get("LORAKIT_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if os.environ.get("LORAKIT_THREADS"):
            torch.set_num_threads(_positive_int("LORAKIT_THREADS", os.environ["LORAKIT_THREADS"]))
        self.max_threads = torch.get_num_threads()
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.changes = 0
        # one /proc/stat read: the first measurement, and whether there is one at all
        self._last = self._sample() if not fixed and self.max_threads > 1 else None
        self.adaptive = self._last is not None

    def describe(self) -> str:
        """For banners: "2 threads, fewer while other processes use the cores"."""
        n = torch.get_num_threads()
        threads = f"{n} thread{'s' if n != 1 else ''}"
        return f"{threads}, fewer while other processes use the cores" if self.adaptive else threads

    def _sample(self) -> tuple[float, int, int, float] | None:
        import os

        ticks = _cpu_ticks(self.cpus)
        if ticks is None:
            return None
        busy, total = ticks
        own = os.times()
        return time.monotonic(), busy, total, own.user + own.system

    def others(self) -> float | None:
        """Cores of ours that other processes used since the last measurement (None: too soon)."""
        import os

        if not self.adaptive or self._last is None:
            return None
        if time.monotonic() - self._last[0] < self.interval:
            return None
        now = self._sample()
        if now is None:
            return None
        (_, busy0, total0, own0), (_, busy1, total1, own1) = self._last, now
        self._last = now
        per_cpu = (total1 - total0) / max(len(self.cpus), 1)  # ticks that passed on each CPU
        if per_cpu <= 0:
            return None
        own = (own1 - own0) * os.sysconf("SC_CLK_TCK")
        return max(0.0, (busy1 - busy0 - own) / per_cpu)

    def poll(self) -> int:
        """Call between batches: re-measures every ``interval`` s; returns the thread count."""
        others = self.others()
        if others is not None:
            want = max(1, min(self.max_threads, math.floor(len(self.cpus) - others + 0.5)))
            if want != torch.get_num_threads():
                torch.set_num_threads(want)
                self.changes += 1
        return torch.get_num_threads()


def _positive_int(name: str, value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise LoraKitError(f"{name} must be a positive whole number of threads, got {value!r}")
    return int(value)


def _cpu_ticks(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of ``cpus`` since boot, from ``/proc/stat``; None without it.

    Busy counts everything but idle and iowait: user, nice, system, irq, softirq and steal.
    """
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            ticks = [int(v) for v in fields[:8]]
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


@functools.cache
def thread_governor() -> ThreadGovernor:
    """The process's one governor (created on first use)."""
    return ThreadGovernor()
