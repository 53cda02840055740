"""Several processes, machines or GPUs: torchrun's environment, torch.distributed, one writer.

``torchrun`` starts one process per device and tells each its place in RANK, WORLD_SIZE and
LOCAL_RANK. ``start`` joins them into a process group (gloo on CPU, NCCL on CUDA) with a
timeout, so a process that stops answering ends the job instead of hanging it. Without
torchrun's variables ``start`` returns a world of one process and everything here does nothing.

How train.py uses it: every process builds the same model and runs its ``shard`` of each
global batch; DDP averages the gradients of the trainable parameters; rank 0 alone prints and
writes files while the others wait at ``barrier``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LoraKitError

TIMEOUT_ENV = "LORAKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds a process waits for the others in any collective


def is_main() -> bool:
    """True in the process that prints and writes: rank 0 of torchrun's job, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise LoraKitError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


@dataclass(frozen=True)
class World:
    """This process's place in the job; ``World()`` is a run of one process."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This process's part of a global batch: contiguous, part sizes differ by at most one."""
        return np.array_split(rows, self.size)[self.rank]

    def barrier(self) -> None:
        if self.size > 1:
            with self.peers():
                dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over every process (a new tensor, same device)."""
        if self.size == 1:
            return values.clone()
        total = values.to(self.device, copy=True)
        with self.peers():
            dist.all_reduce(total)
        return total.to(values.device)

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any: how they agree to stop together."""
        if self.size == 1:
            return flag
        return bool(self.sum(torch.tensor([float(flag)])).item())

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (picklable objects, e.g. RNG states)."""
        if self.size == 1:
            return [obj]
        objects: list[Any] = [None] * self.size
        with self.peers():
            dist.all_gather_object(objects, obj)
        return objects

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over ``model``'s trainable parameters (the frozen ones have no gradient, so DDP
        neither buckets nor all-reduces them); ``model`` itself in a run of one process."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        with self.peers():
            return DistributedDataParallel(
                model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                forward_sync_buffers=False,  # BERT's buffers (position ids) are constants
            )

    def no_sync(self, model: nn.Module, sync: bool) -> AbstractContextManager[Any]:
        """Skip DDP's all-reduce unless ``sync``: accumulation micro-batches add up locally and
        the step's last backward all-reduces their sum."""
        if sync or self.size == 1:
            return nullcontext()
        return model.no_sync()  # type: ignore[operator]

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def peers(self) -> Iterator[None]:
        """A block that talks to the other processes (a collective, DDP's backward): its
        RuntimeError means they are gone, and becomes ``lost``'s one-line error."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # gloo and NCCL: a peer died, or nothing came within the timeout
            if self.size == 1:
                raise
            raise self.lost(e) from None

    def lost(self, error: BaseException) -> LoraKitError:
        """The one-line error of a process whose peers failed or stopped answering."""
        return LoraKitError(
            f"process {self.rank} of {self.size} lost the others ({_gist(error)}); another process "
            f"failed (its error says why) or none answered within {timeout():g} s "
            f"(set {TIMEOUT_ENV} to wait longer)"
        )


def _gist(error: BaseException) -> str:
    """An error's first sentence, without gloo's ``[file:line]`` prefix."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0][:200]


def start(device: torch.device) -> World:
    """Join torchrun's process group when WORLD_SIZE > 1; else a ``World`` of one process.

    On CUDA each process takes the GPU of its LOCAL_RANK and the group uses NCCL; on the CPU,
    gloo. A peer that does not answer within ``LORAKIT_DIST_TIMEOUT`` seconds (default 300)
    ends the job with an error instead of a hang.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=device)
    if not dist.is_available():
        raise LoraKitError(f"WORLD_SIZE is {size} but this torch build has no torch.distributed")
    if device.type not in ("cpu", "cuda"):
        raise LoraKitError(
            f"several processes train on the CPU (gloo) or CUDA (NCCL), not {device.type}; "
            "pass --device cpu"
        )
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout()),
        )
    except (RuntimeError, ValueError) as e:
        raise LoraKitError(
            f"process {rank} of {size} cannot join the others ({_gist(e)}); start every "
            f"process with torchrun (each waits {TIMEOUT_ENV}={timeout():g} s for the others)"
        ) from None
    return World(rank, size, device)
