"""The trainable set and what is done with it: freezing, counting, merging, state dicts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lorakit.errors import LoraKitError
from lorakit.inject import (
    dequantize_base,
    find_heads,
    in_head,
    lora_layers,
    matches_target,
    set_submodule,
)
from lorakit.quant import QuantLinear

Bias = Literal["none", "all", "lora_only"]


def is_lora_param(name: str) -> bool:
    """True for the tensors of a LoRA adapter (``...adapters.<name>.lora_A`` and the like)."""
    return ".adapters." in f".{name}"


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def find_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Modules called ``names`` (exact or dotted suffix, as PEFT's ``modules_to_save``)."""
    return [n for n, _ in model.named_modules() if n and matches_target(n, list(names))]


def mark_only_lora_as_trainable(
    model: nn.Module,
    bias: Bias = "none",
    modules_to_save: Sequence[str] | None = None,
) -> None:
    """Freeze everything except the LoRA tensors, the task head and ``modules_to_save``.

    Args:
        bias: also train every bias ("all") or the biases of LoRA-wrapped layers ("lora_only").
        modules_to_save: more modules trained in full (exact or dotted-suffix names); the task
            head is always trained.
    """
    if bias not in ("none", "all", "lora_only"):
        raise LoraKitError(f"bias must be 'none', 'all' or 'lora_only', not {bias!r}")
    full = find_heads(model) + find_modules(model, modules_to_save or [])
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_param(name) or in_head(name, full))
    if bias == "all":
        for name, param in model.named_parameters():
            if _is_bias(name):
                param.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)


def store_frozen_as(model: nn.Module, dtype: torch.dtype) -> int:
    """Store and run the frozen base in ``dtype`` (bf16: half of fp32's bytes, and activations
    of the same width), keeping every trainable tensor fp32.

    QLoRA's setup without autocast: the base (a quantized one dequantizes to ``dtype``),
    embeddings and LayerNorms compute in ``dtype``; LoRA runs in fp32 on the cast input and
    adds back in ``dtype``. A module holding trainable tensors of its own (the task head,
    ``modules_to_save``) stays fp32 whole, and its floating inputs are cast to fp32 on the
    way in, so the logits and the loss are fp32. Returns the number of parameters cast.
    """
    cast = 0
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if is_lora_param(name + ".") or not own:
            continue
        if any(p.requires_grad for p in own):
            module.register_forward_pre_hook(_inputs_to_fp32)
            continue
        for p in own:
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += p.numel()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.compute_dtype = dtype
    return cast


def _inputs_to_fp32(_module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


@dataclass(frozen=True)
class Layout:
    """What an adapter must hold besides LoRA, in PEFT's terms, read off ``requires_grad``."""

    bias: Bias
    modules_to_save: list[str]  # head names as found, other modules by full dotted name
    params: list[str]  # every non-LoRA parameter the adapter holds


def trainable_layout(model: nn.Module) -> Layout:
    """The bias mode and modules that describe every trainable non-LoRA tensor of ``model``.

    The task head is always part of it. A trainable tensor PEFT's format cannot describe
    (part of a module, or a set of biases that is neither all of them nor the LoRA layers')
    is a ``LoraKitError``: saving must never drop what was trained.
    """
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad and not is_lora_param(n)}
    modules = find_heads(model)
    for name, module in model.named_modules():
        if not name or in_head(name, modules):
            continue
        names = [f"{name}.{p}" for p, _ in module.named_parameters()]
        # A module trained in full (not one holding only biases: those are the bias mode's).
        if names and not all(map(_is_bias, names)) and all(n in trainable for n in names):
            modules.append(name)
    covered = {n for n in params if in_head(n, modules)}
    left = sorted(trainable - covered)
    partial = [n for n in left if not _is_bias(n)]
    if partial:
        raise LoraKitError(
            f"parameter {partial[0]!r} is trainable but its module is not trained in full, "
            "which a PEFT adapter cannot hold: freeze it or train its whole module"
        )
    biases = set(left)
    all_biases = {n for n in params if _is_bias(n) and n not in covered and not is_lora_param(n)}
    lora_biases = {
        f"{name}.base_layer.bias"
        for name, layer in lora_layers(model)
        if layer.base_layer.bias is not None
    } - covered
    bias: Bias = "none"
    if biases and biases == lora_biases:
        bias = "lora_only"
    elif biases and biases == all_biases:
        bias = "all"
    elif biases:
        raise LoraKitError(
            f"{len(biases)} of the model's {len(all_biases)} biases are trainable (e.g. "
            f"{sorted(biases)[0]!r}); a PEFT adapter holds all of them or those of the LoRA "
            "layers only: use mark_only_lora_as_trainable(bias='all' or 'lora_only')"
        )
    return Layout(bias, modules, sorted(covered | biases, key=list(params).index))


def count_lora_parameters(model: nn.Module) -> dict[str, float]:
    """Total, trainable and frozen parameter counts, the trainable percentage, how many
    trainable weights are the adapter's own (the rest: task head, biases, modules to save),
    and, for a quantized base (QLoRA), its weights and the bytes they are stored in."""
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    quantized_params = sum(m.in_features * m.out_features for m in quantized)
    total = sum(p.numel() for p in model.parameters()) + quantized_params
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and is_lora_param(n)
    )
    return {
        "total": total,
        "trainable": trainable,
        "adapter": adapter,
        "frozen": total - trainable,
        "percentage": 100.0 * trainable / total if total else 0.0,
        "quantized_params": quantized_params,
        "quantized_bytes": sum(m.stored_bytes() for m in quantized),
    }


def format_parameter_stats(stats: dict[str, float], variant: str | None = None) -> str:
    """The learning note's "Parameter Statistics" block (naming the variant, when given)."""
    title = f"📊 Parameter Statistics ({variant}):" if variant else "📊 Parameter Statistics:"
    return "\n".join(
        [
            title,
            f"  Total parameters:      {int(stats['total']):>15,}",
            f"  Trainable parameters:  {int(stats['trainable']):>15,}",
            *(
                [f"    of which adapter:    {int(stats['adapter']):>15,}"]
                if stats.get("adapter")
                else []
            ),
            f"  Frozen parameters:     {int(stats['frozen']):>15,}",
            f"  Trainable percentage:  {stats['percentage']:>15.4f}%",
            *_quantized_line(stats),
        ]
    )


def _quantized_line(stats: dict[str, float]) -> list[str]:
    """The quantized base's weights and their bytes, beside what bf16 would take."""
    n = int(stats.get("quantized_params", 0))
    if not n:
        return []
    mib = stats["quantized_bytes"] / 2**20
    return [f"  Quantized base:        {n:>15,} weights in {mib:.1f} MiB (bf16: {n / 2**19:.1f})"]


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
    """Merge and put the plain base layers back, leaving an ordinary transformers model.

    A quantized base (QLoRA) is dequantized first: the result is the full-precision model
    the adapter was trained against, ``dequantize(W) + sBA``.
    """
    dequantize_base(model)
    for name, layer in list(lora_layers(model)):
        layer.merge_weights()
        set_submodule(model, name, layer.base_layer)


def get_lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Everything an adapter holds: its layers' tensors under PEFT's names
    (``<module>.lora_A.weight``, ``.lora_B.weight``, DoRA's ``.lora_magnitude_vector``, IA³'s
    ``.ia3_l``), the head, and every other trainable tensor (see ``trainable_layout``)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        tensors = (layer.adapter(adapter) if adapter else layer.lora).peft_tensors()
        for suffix, tensor in tensors.items():
            state[f"{name}.{suffix}"] = tensor.detach()
    params = dict(model.named_parameters())
    for name in trainable_layout(model).params:
        state[name] = params[name].detach()
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
    missing = [k for k in expected if k not in state]
    if missing:
        raise LoraKitError(f"incomplete adapter: it has no tensor for {missing[0]!r}")


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
