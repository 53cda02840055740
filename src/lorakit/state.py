"""The trainable set and what is done with it: freezing, counting, merging, state dicts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from lorakit.errors import LoraKitError
from lorakit.inject import find_heads, in_head, lora_layers, set_submodule


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
        param.requires_grad_(".adapters." in f".{name}" or in_head(name, heads))
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
        set_submodule(model, name, layer.base_layer)


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
