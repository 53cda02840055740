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
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapter import load_adapter, save_adapter
from lorakit.atomic import atomic_dir, recover
from lorakit.errors import LoraKitError
from lorakit.state import is_lora_param

STATE_NAME = "trainer_state.json"
TENSORS_NAME = "optimizer.pt"
# Without LoRA layers (method head or full) the trained tensors are kept as they are named.
TRAINED_NAME = "trained.safetensors"


def _has_lora(model: nn.Module) -> bool:
    return any(is_lora_param(name) for name, _ in model.named_parameters())


def _save_trained(model: nn.Module, path: Path) -> None:
    save_file(
        {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
        str(path),
    )


def _load_trained(model: nn.Module, path: Path) -> None:
    """Copy the trained tensors back, checked first: every trainable tensor, same shapes."""
    if not path.is_file():
        raise LoraKitError(f"nothing to resume: {path} is missing")
    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items()):
        raise LoraKitError(f"{path} does not hold this model's trainable tensors")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


@dataclass
class LoopState:
    """Where the training loop is, and what it has seen so far."""

    epoch: int = 0  # 0-based epoch in progress
    batch_in_epoch: int = 0  # next step (global batch) to run in this epoch
    global_step: int = 0  # optimizer steps done
    best_metric: float | None = None
    best_epoch: float = 0
    best_eval: dict[str, float] = field(default_factory=dict)  # validation metrics at best
    best_dev: dict[str, float] = field(default_factory=dict)  # dev metrics at best (dev_split)
    history: list[dict[str, Any]] = field(default_factory=list)
    # loss*n, correct, n of the steps since the last metrics line (so resume logs the same)
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    runtime_seconds: float = 0.0  # wall time of the loop, evaluation and saving included
    train_seconds: float = 0.0  # time in training steps only
    train_examples: int = 0
    steady_seconds: float = 0.0
    steady_examples: int = 0
    # How the run was split when saved; a resume may split it otherwise (same global batch).
    world_size: int = 1  # processes
    global_batch: int = 0  # examples per optimizer step: batch_size x processes x accumulation


@dataclass
class Optimization:
    """The objects a training step changes and a checkpoint must restore."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler


def capture_rng() -> dict[str, Any]:
    """Every random generator a step draws from: the CPU's, and each CUDA device's."""
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any], rank: int = 0) -> None:
    """Restore process ``rank``'s generators (``ranks`` holds each process's of a distributed
    run); a process the saved run did not have keeps the generators it was seeded with."""
    ranks = rng.get("ranks", [rng])
    if rank >= len(ranks):
        return
    rng = ranks[rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(
    directory: Path,
    opt: Optimization,
    state: LoopState,
    rng: dict[str, Any],
    base_model: str,
    stateful: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint atomically: adapter (or, without LoRA layers, the trained tensors),
    optimizer, scheduler, scaler, RNG, position, and each ``stateful`` hook's ``state_dict``."""
    from lorakit.adalora import untrimmed

    with atomic_dir(directory) as tmp:
        if _has_lora(opt.model):
            with untrimmed(opt.model):  # AdaLoRA: every triplet, masked ones too
                save_adapter(opt.model, tmp / "adapter", base_model_name_or_path=base_model)
        else:
            _save_trained(opt.model, tmp / TRAINED_NAME)
        torch.save(
            {
                "optimizer": opt.optimizer.state_dict(),
                "scheduler": opt.scheduler.state_dict(),
                "scaler": opt.scaler.state_dict(),
                "rng": rng,
                "hooks": {name: hook.state_dict() for name, hook in (stateful or {}).items()},
            },
            tmp / TENSORS_NAME,
        )
        (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=1))


def load_checkpoint(
    directory: Path, opt: Optimization, stateful: dict[str, Any] | None = None
) -> tuple[LoopState, dict[str, Any]]:
    """Restore ``opt``'s objects and the ``stateful`` hooks in place; return the loop state
    and the RNG states."""
    recover(directory)  # a crash mid-swap left the previous checkpoint aside: put it back
    if not (directory / STATE_NAME).is_file():
        raise LoraKitError(f"nothing to resume: {directory} holds no checkpoint")
    if _has_lora(opt.model):
        load_adapter(opt.model, directory / "adapter")
    else:
        _load_trained(opt.model, directory / TRAINED_NAME)
    # weights_only: plain tensors and containers, no arbitrary pickled objects. Everything comes
    # to the CPU first (a GPU run resumes on a machine without one); the optimizer moves its
    # state to its parameters' device, the RNG states are CPU tensors by nature.
    blob = torch.load(directory / TENSORS_NAME, weights_only=True, map_location="cpu")
    saved_groups = len(blob["optimizer"]["param_groups"])
    if saved_groups != len(opt.optimizer.param_groups):
        raise LoraKitError(
            f"{directory} holds an optimizer of {saved_groups} parameter group(s), this run has "
            f"{len(opt.optimizer.param_groups)} (a lorakit before 2026-12-06 decayed biases and "
            "norms with the rest): resume it with the lorakit that wrote it, or start over"
        )
    opt.optimizer.load_state_dict(blob["optimizer"])
    opt.scheduler.load_state_dict(blob["scheduler"])
    if blob.get("scaler"):
        opt.scaler.load_state_dict(blob["scaler"])
    for name, hook in (stateful or {}).items():
        if name not in blob.get("hooks", {}):
            raise LoraKitError(f"{directory} holds no {name} state to resume: start over")
        hook.load_state_dict(blob["hooks"][name])
    state = LoopState(**json.loads((directory / STATE_NAME).read_text()))
    rng = blob["rng"] if isinstance(blob["rng"], dict) else {"cpu": blob["rng"]}
    return state, rng


def saved_world_size(directory: Path) -> int:
    """How many processes wrote the checkpoint in ``directory`` (1 if it does not say)."""
    recover(directory)
    try:
        return int(json.loads((directory / STATE_NAME).read_text()).get("world_size", 1))
    except (OSError, ValueError, AttributeError):
        return 1  # load_checkpoint says what is wrong with it


BATCH, ACCUMULATION = "training.batch_size", "training.gradient_accumulation_steps"
# Settings that may change on --resume: where files go and how the run is watched or run,
# never what it computes.
RESUMABLE = {
    "training.output_dir",
    "training.overwrite",
    "training.resume",
    "training.push_to_hub",
    "training.hub_model_id",
    "training.hub_private",
    "training.device",
    "training.logging_steps",
    "training.gradient_checkpointing",
    "training.eval_batch_size",
}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _global_batch(flat: dict[str, Any], processes: int) -> tuple[int, str]:
    b, a = flat.get(BATCH, 1), flat.get(ACCUMULATION, 1)
    return b * processes * a, f"{b} x {processes} x {a} = {b * processes * a}"


def check_resume(
    saved: dict[str, Any], config: dict[str, Any], saved_processes: int = 1, processes: int = 1
) -> None:
    """Refuse to resume with settings that would make it another run (``LoraKitError``).

    The global batch (batch_size x processes x gradient_accumulation_steps) must stay; how it
    is split may change, e.g. 2 processes x 16 -> 1 x 32, or 1 x 16 x 2 accumulation steps.

    Args:
        saved: the run's own resolved configuration (its config.yaml), as a dict.
        config: the configuration asked for now, as a dict.
        saved_processes: how many processes wrote the checkpoint.
        processes: how many processes resume it.
    """
    before, now = _flatten(saved), _flatten(config)
    (was, was_text), (will, will_text) = (
        _global_batch(before, saved_processes),
        _global_batch(now, processes),
    )
    free = RESUMABLE | ({BATCH, ACCUMULATION} if was == will else set())
    changed = [
        f"{key} {before[key]!r} -> {now[key]!r}"
        for key in sorted(set(before) & set(now))  # a key newer than the run: its default
        if key not in free and before[key] != now[key]
    ]
    if was != will:
        changed.append(
            f"global batch (batch_size x processes x gradient_accumulation_steps) "
            f"{was_text} -> {will_text} (its split may change, its size may not)"
        )
    if changed:
        raise LoraKitError(
            "--resume continues the same run, but these settings differ from its config.yaml: "
            + "; ".join(changed)
            + ". Start a new run (another --output_dir, or --overwrite) to change them"
        )
