"""Finding the layers LoRA goes into and wrapping them: target matching, injection, heads."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LoraKitError
from lorakit.lora import DEFAULT_ADAPTER, LinearWithLoRA

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


def find_target_modules(model: nn.Module, target_modules: Targets) -> list[str]:
    """Names of the linear layers (outside the task head) that ``target_modules`` selects.

    ``target_modules`` is a list of names, a full-match regex or ``all-linear`` (all of them).

    Raises:
        LoraKitError: nothing matched; the message lists the model's linear layer names.
    """
    heads = find_heads(model)
    linear_names, hits = [], []
    for name, module in model.named_modules():
        if in_head(name, heads) or name.endswith(".base_layer"):
            continue
        if isinstance(module, (nn.Linear, Conv1D, LinearWithLoRA)):
            linear_names.append(name)
            if target_modules == ALL_LINEAR or matches_target(name, target_modules):
                hits.append(name)
    if not hits:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise LoraKitError(
            f"target_modules {target_modules!r} matched no layer of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(leaves)}"
        )
    return hits


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
    for name in find_target_modules(model, target_modules):
        module = model.get_submodule(name)
        if not isinstance(module, LinearWithLoRA):
            set_submodule(model, name, wrap(name, module))
            replaced.append(name)
    return replaced


IA3_TARGETS = ["key", "value", "output.dense"]  # PEFT's default for BERT-family models
IA3_FEEDFORWARD = ["output.dense"]


def apply_ia3_to_model(
    model: nn.Module,
    target_modules: Targets = tuple(IA3_TARGETS),
    feedforward_modules: Targets = tuple(IA3_FEEDFORWARD),
) -> list[str]:
    """Wrap every targeted layer with an IA³ vector (input-side on ``feedforward_modules``).

    Returns:
        The names of the modules that were replaced by this call.
    """

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
