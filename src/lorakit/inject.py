"""Finding the layers LoRA goes into and wrapping them: target matching, injection, heads."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LoraKitError
from lorakit.quant import QUANT_KINDS, QuantLinear, release_freed_memory
from lorakit.targets import AUTO, FAMILIES, attention_targets, auto_targets, family_names
from lorakit.wrapper import DEFAULT_ADAPTER, LinearWithLoRA

# Task heads, trained in full and saved with the adapter (RoBERTa's is `classifier` too).
HEAD_NAMES = ("classifier", "score", "pre_classifier")
# PEFT's shorthand for every linear layer (nn.Linear, GPT-2's Conv1D) except the task head.
ALL_LINEAR = "all-linear"

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


def in_head(name: str, heads: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the linear layers (nn.Linear, GPT-2's Conv1D, wrapped ones) outside the head."""
    heads = find_heads(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D, QuantLinear, LinearWithLoRA))
        and not in_head(name, heads)
        and not name.endswith(".base_layer")
    ]


def find_target_modules(model: nn.Module, target_modules: Targets) -> list[str]:
    """Names of the linear layers (outside the task head) that ``target_modules`` selects.

    ``target_modules`` is a list of names, a full-match regex or ``all-linear`` (all of them).

    Raises:
        LoraKitError: nothing matched; the message lists the model's linear layer names.
    """
    linear_names = linear_layer_names(model)
    hits = [
        name
        for name in linear_names
        if target_modules == ALL_LINEAR or matches_target(name, target_modules)
    ]
    if not hits:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise LoraKitError(
            f"target_modules {target_modules!r} matched no layer of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(leaves)}"
        )
    return hits


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` (``bert``, ``mpnet``, ...); None for a model without one."""
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_targets(model: nn.Module, target_modules: Targets) -> Targets:
    """The targets to wrap: ``auto`` becomes the family's attention and feed-forward layers
    (``lorakit.targets``), and the note's names (``query``, ``dense``, ``output.dense``, ...)
    are spelled as the model's family spells them. Regexes and ``all-linear`` stay as given.

    Raises:
        LoraKitError: ``auto`` on a family the table lacks; or a listed name that matches no
            layer while some of the family's attention projections stay unwrapped.
    """
    family = model_type(model)
    if target_modules == AUTO:
        auto = auto_targets(family)
        if auto is None:
            raise LoraKitError(
                f"target_modules auto knows the model types {', '.join(FAMILIES)}, not "
                f"{family!r} ({type(model).__name__}): list the layers to wrap, or all-linear"
            )
        return auto
    if isinstance(target_modules, str):
        return target_modules
    resolved = family_names(family, target_modules)
    _refuse_missed_attention(model, family, target_modules, resolved)
    return resolved


def _refuse_missed_attention(
    model: nn.Module, family: str | None, listed: Sequence[str], resolved: list[str]
) -> None:
    """A name that matches nothing, beside attention projections left unwrapped, is most likely
    another family's spelling of them: refuse rather than train without LoRA on attention."""
    layers = linear_layer_names(model)
    wrapped = {n for n in layers if matches_target(n, resolved)}
    attention = attention_targets(family)
    unwrapped = [n for n in layers if matches_target(n, attention) and n not in wrapped]
    missed = [
        t for t in listed if not any(matches_target(n, family_names(family, [t])) for n in layers)
    ]
    if wrapped and unwrapped and missed:  # nothing wrapped: find_target_modules' error
        raise LoraKitError(
            f"target_modules {', '.join(missed)} match no layer of {type(model).__name__}, "
            f"whose attention projections are named {', '.join(attention)}: list those, "
            "the note's query/key/value/dense, or auto"
        )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora_to_model(
    model: nn.Module,
    target_modules: Targets,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> list[str]:
    """Wrap every targeted linear layer in ``LinearWithLoRA``, in place.

    Layers already wrapped are left alone, so applying twice never stacks LoRA.

    Args:
        target_modules: layer names, a regex, ``all-linear`` or ``auto``; see ``resolve_targets``.
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        use_dora: DoRA, a trainable magnitude per output row on top of LoRA.

    Returns:
        The names of the modules that were replaced by this call.
    """
    return _wrap_each(
        model,
        target_modules,
        lambda _, module: LinearWithLoRA(
            module, rank, alpha, dropout, use_rslora=use_rslora, use_dora=use_dora
        ),
    )


def _wrap_each(
    model: nn.Module, target_modules: Targets, wrap: Callable[[str, nn.Module], LinearWithLoRA]
) -> list[str]:
    """Replace every targeted layer not yet wrapped by ``wrap(name, layer)``; their names."""
    replaced = []
    for name in find_target_modules(model, resolve_targets(model, target_modules)):
        module = model.get_submodule(name)
        if not isinstance(module, LinearWithLoRA):
            set_submodule(model, name, wrap(name, module))
            replaced.append(name)
    return replaced


def apply_adalora_to_model(
    model: nn.Module,
    target_modules: Targets,
    init_r: int = 12,
    alpha: float = 8.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every targeted layer with an AdaLoRA update of rank ``init_r`` (Λ = 0), in place.

    Returns:
        The names of the modules that were replaced by this call.
    """
    from lorakit.adalora import AdaLoRALayer

    def wrap(_: str, module: nn.Module) -> LinearWithLoRA:
        wrapper = LinearWithLoRA(module, None)
        AdaLoRALayer.add_to(wrapper, DEFAULT_ADAPTER, init_r, alpha, dropout)
        return wrapper

    return _wrap_each(model, target_modules, wrap)


IA3_TARGETS = ["key", "value", "output.dense"]  # PEFT's default for BERT-family models
IA3_FEEDFORWARD = ["output.dense"]


def apply_ia3_to_model(
    model: nn.Module,
    target_modules: Targets = tuple(IA3_TARGETS),
    feedforward_modules: Targets = tuple(IA3_FEEDFORWARD),
) -> list[str]:
    """Wrap every targeted layer with an IA³ vector (input-side on ``feedforward_modules``).

    Both take the note's names, spelled for the model's family as ``resolve_targets`` says.

    Returns:
        The names of the modules that were replaced by this call.
    """
    if not isinstance(feedforward_modules, str):
        feedforward_modules = family_names(model_type(model), feedforward_modules)

    def wrap(name: str, module: nn.Module) -> LinearWithLoRA:
        wrapper = LinearWithLoRA(module, None)
        wrapper.add_ia3(DEFAULT_ADAPTER, matches_target(name, feedforward_modules))
        return wrapper

    return _wrap_each(model, target_modules, wrap)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LinearWithLoRA]]:
    """(name, layer) for every LoRA-wrapped layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            yield name, module


def quantize_base(model: nn.Module, kind: str) -> dict[str, int]:
    """QLoRA's base: every linear layer outside the task head stored as ``kind`` (``nf4`` or
    ``int8``, see ``lorakit.quant``), in place, before or after adapters are added.

    A LoRA layer keeps its adapters over a quantized base. Embeddings, LayerNorms and the head
    are not touched (full precision, as in the paper). Returns the number of ``layers``
    quantized, their ``params``, and the ``bytes_before`` / ``bytes_after`` of their weights.
    """
    if kind not in QUANT_KINDS:
        raise LoraKitError(f"quantize_base {kind!r} is not one of {', '.join(QUANT_KINDS)}")
    stats = {"layers": 0, "params": 0, "bytes_before": 0, "bytes_after": 0}
    for name in linear_layer_names(model):
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LinearWithLoRA) else module
        if isinstance(base, QuantLinear):
            continue
        quantized = QuantLinear.from_linear(base, kind)  # type: ignore[arg-type]
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        stats["layers"] += 1
        stats["params"] += weight.numel()
        stats["bytes_before"] += weight.numel() * weight.element_size()
        stats["bytes_after"] += quantized.stored_bytes()
        if isinstance(module, LinearWithLoRA):
            module.base_layer = quantized
        else:
            set_submodule(model, name, quantized)
        del base, weight, module
    release_freed_memory()
    return stats


def quantized_kind(model: nn.Module) -> str | None:
    """``nf4`` or ``int8`` when ``model``'s base is quantized (``quantize_base``), else None."""
    kinds = {m.kind for m in model.modules() if isinstance(m, QuantLinear)}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)


def dequantize_base(model: nn.Module) -> None:
    """Every quantized layer back to a plain ``nn.Linear`` holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        base = module.base_layer if isinstance(module, LinearWithLoRA) else None
        if isinstance(base, QuantLinear):
            module.base_layer = base.to_linear()
        elif isinstance(module, QuantLinear):
            set_submodule(model, name, module.to_linear())
