"""Exact-resume checkpoints: LoRA + head, optimizer, scheduler, RNG and loop position.

A checkpoint is written into a temporary directory and renamed into place, so a kill at
any moment leaves the previous good checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapter import load_adapter, save_adapter
from lorakit.atomic import atomic_dir
from lorakit.errors import LoraKitError

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "optimizer.pt"


@dataclass
class LoopState:
    """Where the training loop is, and what it has seen so far."""

    epoch: int = 0  # 0-based epoch in progress
    batch_in_epoch: int = 0  # next batch to run in this epoch
    global_step: int = 0  # optimizer steps done
    best_metric: float | None = None
    best_epoch: float = 0
    best_eval: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    # loss*n, correct, n of the steps since the last metrics line (so resume logs the same)
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    runtime_seconds: float = 0.0  # wall time of the loop, evaluation and saving included
    train_seconds: float = 0.0  # time in training steps only
    train_examples: int = 0
    steady_seconds: float = 0.0
    steady_examples: int = 0


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: LoopState,
    rng_state: torch.Tensor,
    base_model: str,
) -> None:
    with atomic_dir(directory) as tmp:
        save_adapter(model, tmp / "adapter", base_model_name_or_path=base_model)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state,
            },
            tmp / TENSORS_NAME,
        )
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=1))


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[LoopState, torch.Tensor]:
    """Restore model, optimizer and scheduler in place; return the loop state and RNG state."""
    if not (directory / STATE_NAME).is_file():
        raise LoraKitError(f"nothing to resume: {directory} holds no checkpoint")
    load_adapter(model, directory / "adapter")
    # weights_only: plain tensors and containers, no arbitrary pickled objects.
    blob = torch.load(directory / TENSORS_NAME, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    state = LoopState(**json.loads((directory / STATE_NAME).read_text()))
    return state, blob["rng"]
