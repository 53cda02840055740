"""Adapter directories in Hugging Face PEFT's layout, and putting one into a model.

``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight`` (DoRA adds ``.lora_magnitude_vector``; IA³ has ``.ia3_l`` instead) and
``base_model.model.<head>.<param>``, exactly what ``peft.PeftModel`` writes and reads;
``adapter_config.json`` is described in ``lorakit.adapter_config``. Only json and safetensors
are ever read, never pickle.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapter_config import (
    CONFIG_NAME,
    LORAKIT_NAME,
    pattern_value,
    plain_lora_config,
    read_adapter_config,
)
from lorakit.atomic import atomic_dir, readable
from lorakit.errors import LoraKitError
from lorakit.inject import (
    find_heads,
    find_target_modules,
    in_head,
    lora_layers,
    matches_target,
    quantized_kind,
    set_submodule,
)
from lorakit.state import (
    find_modules,
    get_lora_state_dict,
    is_lora_param,
    mark_only_lora_as_trainable,
    trainable_layout,
)
from lorakit.wrapper import DEFAULT_ADAPTER, KINDS, LinearWithLoRA

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# A layer's own adapter tensors: "<layer>.lora_A.weight", ".lora_B.weight", DoRA's
# ".lora_magnitude_vector", IA³'s ".ia3_l", AdaLoRA's ".lora_A", ".lora_E", ".lora_B".
# Everything else is a head or base tensor.
LAYER_TENSOR = re.compile(
    r"(.*)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|ia3_l|lora_[ABE])$"
)


def _spec(model: nn.Module, names: list[str]) -> list[str]:
    """Shortest target list selecting exactly ``names`` among the wrapped layers."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if set(find_target_modules(model, leaves)) == set(names):
        return leaves
    return sorted(names)


def _peft_config(model: nn.Module, bias: str) -> dict[str, Any]:
    """PEFT's config for the model's active adapter layers (one kind: LoRA or IA³)."""
    layers = [(name, layer.lora) for name, layer in lora_layers(model)]
    if not layers:
        raise LoraKitError("the model has no LoRA layers to save")
    kinds = {type(a) for _, a in layers}
    if len(kinds) > 1:
        raise LoraKitError("the model mixes LoRA and IA³ layers; an adapter holds one kind")
    kind = kinds.pop()
    names = [name for name, _ in layers]
    try:
        config = kind.peft_config(layers, bias)
    except ValueError as e:
        raise LoraKitError(str(e)) from None
    config["target_modules"] = sorted(names) if kind.full_target_names else _spec(model, names)
    config["fan_in_fan_out"] = next(layer for _, layer in lora_layers(model)).fan_in_fan_out
    return config


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    task: str | None = None,
    extra: dict[str, Any] | None = None,
    plain_lora: bool = False,
) -> Path:
    """Write the active adapter, the head and every other trained tensor as a PEFT directory.

    ``adapter_config.json`` says what is saved (``bias``, ``modules_to_save``, per-layer
    ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``, ``use_dora``, or IA³'s keys);
    lorakit's own facts (labels, task, ``extra``) go to ``lorakit.json``. A trainable tensor
    the format cannot hold is refused, never dropped. ``plain_lora`` writes rsLoRA as the
    equivalent plain LoRA, for runtimes that ignore ``use_rslora``. The directory appears
    complete or not at all (``lorakit.atomic``).
    """
    layout = trainable_layout(model)
    label_cfg = getattr(model, "config", None)
    config: dict[str, Any] = {
        "task_type": "SEQ_CLS",
        **_peft_config(model, layout.bias),
        "modules_to_save": layout.modules_to_save,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(label_cfg, "_name_or_path", None),
        "inference_mode": True,
    }
    if plain_lora:
        config = plain_lora_config(config)
    meta: dict[str, Any] = {"task": task, "lorakit_version": lorakit_version()}
    if label_cfg is not None:
        meta["num_labels"] = label_cfg.num_labels
        meta["id2label"] = {str(k): v for k, v in label_cfg.id2label.items()}
        meta["label2id"] = dict(label_cfg.label2id)
    if quantized_kind(model):
        meta["quantize_base"] = quantized_kind(model)  # what the adapter was trained against
    meta.update(extra or {})
    state = {
        PREFIX + k: v.detach().to("cpu").contiguous() for k, v in get_lora_state_dict(model).items()
    }
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / LORAKIT_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def lorakit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:
        return "unknown"


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by model-relative names (PEFT's prefix removed).

    PEFT stores a head trained in full as ``<head>.modules_to_save.<param>`` (and, with
    ``bias="all"``, the frozen original as ``<head>.original_module.<param>``): the trained
    copy is read as ``<head>.<param>``, the original is dropped.
    """
    path = readable(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise LoraKitError(f"{path} is missing (lorakit reads only safetensors, never pickle)")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LoraKitError(f"{path} is not a readable safetensors file: {e}") from None
    state: dict[str, torch.Tensor] = {}
    trained_copies = []
    for key, value in raw.items():
        key = key.removeprefix(PREFIX)
        if ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            # PEFT's bias="all" path can leave the adapter name in: ``.modules_to_save.default.``
            trained_copies.append((re.sub(r"\.modules_to_save\.(default\.)?", ".", key), value))
        else:
            state[key] = value
    state.update(trained_copies)
    return state


def _extra_params(model: nn.Module, targets: list[str], config: dict[str, Any]) -> dict[str, tuple]:
    """Key -> shape of the non-LoRA tensors the adapter must hold for ``model``.

    Keys are named as in the model after wrapping: a target's own bias is
    ``<target>.base_layer.bias``, as PEFT and lorakit both write it.
    """
    bias = config.get("bias", "none")
    full = find_heads(model) + find_modules(model, config.get("modules_to_save") or [])
    wrapped = set(targets) | {f"{t}.base_layer" for t in targets}
    expected = {}
    for name, param in model.named_parameters():
        if is_lora_param(name):
            continue
        module, _, leaf = name.rpartition(".")
        key = f"{module}.base_layer.{leaf}" if module in targets else name
        is_bias = leaf == "bias"
        if (
            in_head(name, full)
            or (bias == "all" and is_bias)
            or (bias == "lora_only" and is_bias and module in wrapped)
        ):
            expected[key] = tuple(param.shape)
    return expected


@dataclass(frozen=True)
class LayerPlan:
    """One layer an adapter adapts: its kind and, for LoRA, its rank and alpha."""

    name: str
    kind: str  # the adapter kind's PEFT type: LORA, IA3
    rank: int = 0
    alpha: float = 0.0
    feedforward: bool = False  # IA³: scales the input


def _in_out(model: nn.Module, name: str) -> tuple[int, int]:
    module = model.get_submodule(name)
    if isinstance(module, Conv1D):  # GPT-2's: weight (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    # nn.Linear, LinearWithLoRA and QuantLinear all say it
    return cast(int, module.in_features), cast(int, module.out_features)


def _expect(state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> None:
    if key not in state:
        raise LoraKitError(f"incomplete adapter: it has no tensor for {key!r}")
    if tuple(state[key].shape) != shape:
        raise LoraKitError(
            f"adapter tensor {key!r} has shape {tuple(state[key].shape)}, the model "
            f"expects {shape}: was this adapter trained on another base model?"
        )


def lora_plan(
    model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> list[LayerPlan]:
    """Check the adapter's layer tensors (LoRA, DoRA or IA³) against ``model``, changing nothing.

    Returns:
        One ``LayerPlan`` per layer the adapter adapts.
    """
    kind = KINDS[config["peft_type"]]
    targets = find_target_modules(model, config["target_modules"])
    plan = []
    for name in targets:
        n_in, n_out = _in_out(model, name)
        ff = matches_target(name, config.get("feedforward_modules") or [])
        rank = kind.layer_rank(name, config)
        default_alpha = config.get("lora_alpha") or 0.0
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, name, default_alpha))
        spec = LayerPlan(name, kind.kind, rank, alpha, ff)
        for suffix, shape in kind.tensor_shapes(spec, n_in, n_out, config).items():
            _expect(state, f"{name}.{suffix}", shape)
        plan.append(spec)
    target_set = set(targets)
    for key in state:
        layer = LAYER_TENSOR.match(key)
        if layer and layer.group(1) not in target_set:
            raise LoraKitError(f"adapter tensor {key!r} matches no target layer of the model")
    return plan


def attach(
    model: nn.Module,
    plan: list[LayerPlan],
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    adapter_name: str = DEFAULT_ADAPTER,
) -> list[LinearWithLoRA]:
    """Give every planned layer the adapter ``adapter_name`` with the adapter's tensors.

    An existing adapter of that name and shape is reused (an optimizer may hold its tensors).

    Returns:
        The wrappers of the planned layers.
    """
    kind = KINDS[config["peft_type"]]
    wrappers = []
    for p in plan:
        module = model.get_submodule(p.name)
        if isinstance(module, LinearWithLoRA):
            module.unmerge_weights()
        else:
            module = LinearWithLoRA(module, None)
            set_submodule(model, p.name, module)
        layer = kind.attach(module, adapter_name, p, config)
        module.active_adapter = adapter_name
        with torch.no_grad():
            for suffix, tensor in layer.peft_tensors().items():
                tensor.copy_(state[f"{p.name}.{suffix}"])
        wrappers.append(module)
    planned = {p.name for p in plan}
    for name, module in lora_layers(model):  # what an earlier adapter of this name left
        if name not in planned and adapter_name in module.adapters:
            module.remove_adapter(adapter_name)
    return wrappers


def _check_fits(
    model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> list[LayerPlan]:
    """``lora_plan``, and every other tensor checked against its place in ``model``."""
    plan = lora_plan(model, config, state)
    extra = _extra_params(model, [p.name for p in plan], config)
    for key, value in state.items():
        if LAYER_TENSOR.match(key):
            continue
        if key not in extra:
            raise LoraKitError(f"adapter tensor {key!r} has no place in the model")
        if tuple(value.shape) != extra[key]:
            raise LoraKitError(
                f"adapter tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{extra[key]} (num_labels differs?)"
            )
    missing = [k for k in extra if k not in state]
    if missing:
        raise LoraKitError(
            f"incomplete adapter: it has no tensor for {missing[0]!r} (its task head and "
            f"bias={config.get('bias', 'none')!r} tensors must be saved with it)"
        )
    return plan


@torch.no_grad()
def load_adapter(
    model: nn.Module, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, Any]:
    """Put the adapter (LoRA, rsLoRA, DoRA or IA³) into ``model`` with all its tensors.

    Everything is checked first: an adapter that does not fit, or lacks a tensor its config
    says it holds (the task head above all), raises ``LoraKitError`` naming the first problem
    and leaves the model exactly as it was. Afterwards exactly the adapter's tensors are
    trainable, so saving the model again writes the same adapter.

    Returns:
        The adapter's config (with its label maps, task and metrics when lorakit wrote it).
    """
    config = read_adapter_config(directory)
    state = read_adapter_weights(directory)
    plan = _check_fits(model, config, state)
    attach(model, plan, config, state, adapter_name)
    mark_only_lora_as_trainable(model, config.get("bias", "none"), config.get("modules_to_save"))
    params = dict(model.named_parameters())
    for key, value in state.items():
        if key in params:
            params[key].copy_(value.to(params[key].dtype))
    _apply_label_maps(model, config)
    return config


def _apply_label_maps(model: nn.Module, config: dict[str, Any]) -> None:
    model_cfg = getattr(model, "config", None)
    if model_cfg is None or not config.get("id2label"):
        return
    model_cfg.id2label = {int(k): v for k, v in config["id2label"].items()}
    model_cfg.label2id = {v: int(k) for k, v in config["id2label"].items()}


__all__ = ["attach", "load_adapter", "lora_plan", "read_adapter_config", "save_adapter"]
