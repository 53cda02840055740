"""Putting LoRA into a model: target matching, injection, the trainable set, merging."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LoraKitError
from lorakit.lora import LinearWithLoRA

# Task heads, trained in full and saved with the adapter (RoBERTa's is `classifier` too).
HEAD_NAMES = ("classifier", "score", "pre_classifier")

Targets = str | Sequence[str]


def matches_target(name: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exact or dotted-suffix names."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_heads(model: nn.Module) -> list[str]:
    """Names of the top-level task-head modules present in ``model``."""
    inner = dict(model.named_children())
    return [n for n in HEAD_NAMES if n in inner]


def _in_head(name: str, heads: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def find_target_modules(model: nn.Module, target_modules: Targets) -> list[str]:
    """Names of the linear layers (outside the task head) that ``target_modules`` selects.

    Raises:
        LoraKitError: nothing matched; the message lists the model's linear layer names.
    """
    heads = find_heads(model)
    linear_names, hits = [], []
    for name, module in model.named_modules():
        if _in_head(name, heads) or name.endswith(".base_layer"):
            continue
        if isinstance(module, (nn.Linear, Conv1D, LinearWithLoRA)):
            linear_names.append(name)
            if matches_target(name, target_modules):
                hits.append(name)
    if not hits:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise LoraKitError(
            f"target_modules {target_modules!r} matched no layer of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(leaves)}"
        )
    return hits


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora_to_model(
    model: nn.Module,
    target_modules: Targets,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every targeted linear layer in ``LinearWithLoRA``, in place.

    Layers already wrapped are left alone, so applying twice never stacks LoRA.

    Returns:
        The names of the modules that were replaced by this call.
    """
    replaced = []
    for name in find_target_modules(model, target_modules):
        module = model.get_submodule(name)
        if isinstance(module, LinearWithLoRA):
            continue
        _set_submodule(model, name, LinearWithLoRA(module, rank, alpha, dropout))
        replaced.append(name)
    return replaced


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    """(name, layer) for every LoRA-wrapped layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            yield name, module


def mark_only_lora_as_trainable(
    model: nn.Module,
    bias: Literal["none", "all", "lora_only"] = "none",
    modules_to_save: Sequence[str] | None = None,
) -> None:
    """Freeze everything except the LoRA tensors and the task head.

    Args:
        bias: also train every bias ("all") or the biases of LoRA-wrapped layers ("lora_only").
        modules_to_save: head modules trained in full; auto-detected when None.
    """
    if bias not in ("none", "all", "lora_only"):
        raise LoraKitError(f"bias must be 'none', 'all' or 'lora_only', not {bias!r}")
    heads = find_heads(model) if modules_to_save is None else list(modules_to_save)
    for name, param in model.named_parameters():
        param.requires_grad_(".adapters." in f".{name}" or _in_head(name, heads))
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)


def count_lora_parameters(model: nn.Module) -> dict[str, float]:
    """Total, trainable and frozen parameter counts, and the trainable percentage."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "total": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "percentage": 100.0 * trainable / total if total else 0.0,
    }


def format_parameter_stats(stats: dict[str, float]) -> str:
    """The learning note's "Parameter Statistics" block."""
    return "\n".join(
        [
            "📊 Parameter Statistics:",
            f"  Total parameters:      {int(stats['total']):>15,}",
            f"  Trainable parameters:  {int(stats['trainable']):>15,}",
            f"  Frozen parameters:     {int(stats['frozen']):>15,}",
            f"  Trainable percentage:  {stats['percentage']:>15.4f}%",
        ]
    )


def merge_lora_weights(model: nn.Module) -> None:
    """Fold every active adapter into its base weight: ``W' = W + (alpha/rank)·BA``."""
    for _, layer in lora_layers(model):
        layer.merge_weights()


def unmerge_lora_weights(model: nn.Module) -> None:
    """Undo ``merge_lora_weights``."""
    for _, layer in lora_layers(model):
        layer.unmerge_weights()


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Run the base model without unloading anything (merged layers are unmerged meanwhile)."""
    layers = [layer for _, layer in lora_layers(model)]
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        layer.unmerge_weights()
        layer.disabled = True
    try:
        yield
    finally:
        for layer, merged in zip(layers, was_merged, strict=True):
            layer.disabled = False
            if merged:
                layer.merge_weights()


def unwrap_lora(model: nn.Module) -> None:
    """Merge and put the plain base layers back, leaving an ordinary transformers model."""
    for name, layer in list(lora_layers(model)):
        layer.merge_weights()
        _set_submodule(model, name, layer.base_layer)


def get_lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """LoRA tensors (``<module>.lora_A.weight`` / ``.lora_B.weight``) and the head's tensors."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        lora = layer.adapter(adapter) if adapter else layer.lora
        state[f"{name}.lora_A.weight"] = lora.lora_A.detach()
        state[f"{name}.lora_B.weight"] = lora.lora_B.detach()
    for head in find_heads(model):
        for pname, param in model.get_submodule(head).named_parameters():
            state[f"{head}.{pname}"] = param.detach()
    return state


def check_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise ``LoraKitError`` naming the first key with no home in ``model`` or a wrong shape."""
    expected = {k: tuple(v.shape) for k, v in get_lora_state_dict(model).items()}
    for key, tensor in state.items():
        if key not in expected:
            raise LoraKitError(
                f"adapter tensor {key!r} has no matching LoRA layer or head in the model"
            )
        if tuple(tensor.shape) != expected[key]:
            raise LoraKitError(
                f"adapter tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {expected[key]}"
            )
    missing = [k for k in expected if ".lora_" in k and k not in state]
    if missing:
        raise LoraKitError(f"adapter has no tensor for {missing[0]!r}")


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA and head tensors into ``model`` (checked first, so a misfit changes nothing)."""
    check_lora_state_dict(model, state)
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge_weights()
    targets = get_lora_state_dict(model)
    for key, tensor in state.items():
        targets[key].copy_(tensor.to(targets[key].dtype))
    for layer in merged:
        layer.merge_weights()
