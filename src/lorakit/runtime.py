"""Device and precision: picking the device, knowing whether bf16 is fast here, autocast."""

from __future__ import annotations

import functools
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


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision == "auto":
        return torch.bfloat16 if bf16_fast(device) else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    raise LoraKitError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")


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
