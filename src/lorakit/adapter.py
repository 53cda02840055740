"""Adapter directories in Hugging Face PEFT's layout: ``adapter_config.json`` + safetensors.

Only json and safetensors are ever read, never pickle. Tensor keys are
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and
``base_model.model.<head>.<param>``, exactly what ``peft.PeftModel`` writes and reads.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.atomic import atomic_dir, recover
from lorakit.errors import LoraKitError
from lorakit.inject import (
    find_heads,
    find_target_modules,
    in_head,
    lora_layers,
    matches_target,
    set_submodule,
)
from lorakit.lora import DEFAULT_ADAPTER, LinearWithLoRA
from lorakit.state import (
    find_modules,
    get_lora_state_dict,
    is_lora_param,
    mark_only_lora_as_trainable,
    trainable_layout,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORAKIT_NAME = "lorakit.json"
PREFIX = "base_model.model."

# Keys PEFT writes for LoRA that lorakit understands (or knows to be harmless at these values).
KNOWN_KEYS = {
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "base_model_name_or_path",
    "bias",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "use_rslora",
    "use_dora",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "revision",
    "auto_mapping",
    "peft_version",
    "id2label",
    "label2id",
    "num_labels",
    "task",
    "lorakit_version",
    "max_length",
    "text_columns",
    "metrics",
    "exclude_modules",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "layer_replication",
    "runtime_config",
    "eva_config",
    "corda_config",
    "trainable_token_indices",
    "lora_bias",
    "target_parameters",
    "qalora_group_size",
    "use_qalora",
    "ensure_weight_tying",
    "arrow_config",
    "alora_invocation_tokens",
    "lora_ga_config",
    "kasa_config",
    "monteclora_config",
    "use_bdlora",
    "velora_config",
}
# Features of PEFT's LoRA that change the math; an adapter using them would load wrong.
UNSUPPORTED = {"use_dora": True, "use_rslora": True, "lora_bias": True}
# What lorakit knows about an adapter that PEFT has no key for; kept in LORAKIT_NAME so that
# adapter_config.json holds PEFT's keys only and PEFT loads it without a warning.
LORAKIT_KEYS = ("task", "num_labels", "id2label", "label2id", "lorakit_version")


def _target_spec(model: nn.Module) -> list[str]:
    """Shortest target list that selects exactly the wrapped layers: leaf names, else full names."""
    wrapped = [name for name, _ in lora_layers(model)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    if set(find_target_modules(model, leaves)) == set(wrapped):
        return leaves
    return sorted(wrapped)


def _patterned(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value, and the layers that differ from it (PEFT's ``*_pattern``)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {name: v for name, v in values.items() if v != common}


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's lookup: the first key that full-matches a dotted suffix of ``name``, else default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    task: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the active adapter, the head and every other trained tensor as a PEFT directory.

    ``adapter_config.json`` says what is saved (``bias``, ``modules_to_save``, per-layer
    ``rank_pattern`` / ``alpha_pattern``); lorakit's own facts (labels, task, ``extra``) go to
    ``lorakit.json``. A trainable tensor the format cannot hold is refused, never dropped.
    The directory appears complete or not at all (``lorakit.atomic``).
    """
    layers = list(lora_layers(model))
    if not layers:
        raise LoraKitError("the model has no LoRA layers to save")
    layout = trainable_layout(model)
    r, rank_pattern = _patterned({name: layer.lora.rank for name, layer in layers})
    alpha, alpha_pattern = _patterned({name: layer.lora.alpha for name, layer in layers})
    dropout = layers[0][1].lora.dropout
    label_cfg = getattr(model, "config", None)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        "target_modules": _target_spec(model),
        "modules_to_save": layout.modules_to_save,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(label_cfg, "_name_or_path", None),
        "bias": layout.bias,
        "fan_in_fan_out": layers[0][1].fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    meta: dict[str, Any] = {"task": task, "lorakit_version": _version()}
    if label_cfg is not None:
        meta["num_labels"] = label_cfg.num_labels
        meta["id2label"] = {str(k): v for k, v in label_cfg.id2label.items()}
        meta["label2id"] = dict(label_cfg.label2id)
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:
        return "unknown"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraKitError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LoraKitError(f"{path} must hold a JSON object")
    return data


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` checked, with ``lorakit.json``'s keys (labels, task) merged in.

    Unknown keys are a warning, not a failure.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir() and not recover(directory):
        raise LoraKitError(f"adapter directory {directory} does not exist")
    if not path.is_file():
        raise LoraKitError(f"{directory} is not an adapter directory: {CONFIG_NAME} is missing")
    config = _read_json(path)
    if config.get("peft_type") != "LORA":
        raise LoraKitError(f"{path} is not a LoRA adapter config (peft_type must be 'LORA')")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise LoraKitError(f"{path} lacks the required key {key!r}")
    for key, bad in UNSUPPORTED.items():
        if config.get(key) == bad:
            raise LoraKitError(f"{path}: {key}={bad} is not supported by lorakit")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise LoraKitError(f"{path}: {key} must be a mapping of layer patterns to numbers")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise LoraKitError(f"{path}: bias must be none, all or lora_only, not {config['bias']!r}")
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        logger.warning("%s: ignoring unknown keys %s", path, ", ".join(unknown))
    if (directory / LORAKIT_NAME).is_file():
        config.update(_read_json(directory / LORAKIT_NAME))
    return config


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by model-relative names (PEFT's prefix removed).

    PEFT stores a head trained in full as ``<head>.modules_to_save.<param>`` (and, with
    ``bias="all"``, the frozen original as ``<head>.original_module.<param>``): the trained
    copy is read as ``<head>.<param>``, the original is dropped.
    """
    path = Path(directory) / WEIGHTS_NAME
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


def lora_plan(
    model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> list[tuple[str, int, float]]:
    """Check the adapter's LoRA tensors against ``model``'s layers, changing nothing.

    Returns:
        (target name, rank, alpha) for every layer the adapter wraps.
    """
    targets = find_target_modules(model, config["target_modules"])
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    plan = []
    for name in targets:
        r = int(pattern_value(rank_pattern, name, config["r"]))
        alpha = float(pattern_value(alpha_pattern, name, config["lora_alpha"]))
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LinearWithLoRA) else module
        w: torch.Tensor = base.weight  # type: ignore[assignment]
        # GPT-2's Conv1D stores (in, out); nn.Linear (out, in).
        n_in, n_out = (w.shape[1], w.shape[0]) if isinstance(base, nn.Linear) else w.shape[:2]
        for key, shape in (
            (f"{name}.lora_A.weight", (r, n_in)),
            (f"{name}.lora_B.weight", (n_out, r)),
        ):
            if key not in state:
                raise LoraKitError(f"incomplete adapter: it has no tensor for {key!r}")
            if tuple(state[key].shape) != shape:
                raise LoraKitError(
                    f"adapter tensor {key!r} has shape {tuple(state[key].shape)}, the model "
                    f"expects {shape}: was this adapter trained on another base model?"
                )
        plan.append((name, r, alpha))
    target_set = set(targets)
    for key in state:
        if ".lora_" in key and key.rsplit(".lora_", 1)[0] not in target_set:
            raise LoraKitError(f"adapter tensor {key!r} matches no target layer of the model")
    return plan


def _check_fits(
    model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> list[tuple[str, int, float]]:
    """``lora_plan``, and every other tensor checked against its place in ``model``."""
    plan = lora_plan(model, config, state)
    extra = _extra_params(model, [name for name, _, _ in plan], config)
    for key, value in state.items():
        if ".lora_" in key:
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
    """Inject LoRA as the adapter's config says and load all its tensors into ``model``.

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
    dropout = float(config.get("lora_dropout", 0.0))
    for name, r, alpha in plan:
        module = model.get_submodule(name)
        if isinstance(module, LinearWithLoRA):
            module.unmerge_weights()
            if adapter_name in module.adapters and module.adapter(adapter_name).rank == r:
                lora = module.adapter(adapter_name)  # reuse: an optimizer may hold these
                lora.alpha, lora.scaling = alpha, alpha / r
            else:
                lora = module.add_adapter(adapter_name, r, alpha, dropout)
            module.active_adapter = adapter_name
        else:
            wrapper = LinearWithLoRA(module, r, alpha, dropout, adapter_name)
            set_submodule(model, name, wrapper)
            lora = wrapper.lora
        lora.lora_A.copy_(state[f"{name}.lora_A.weight"])
        lora.lora_B.copy_(state[f"{name}.lora_B.weight"])
    mark_only_lora_as_trainable(model, config.get("bias", "none"), config.get("modules_to_save"))
    params = dict(model.named_parameters())
    for key, value in state.items():
        if ".lora_" not in key:
            params[key].copy_(value.to(params[key].dtype))
    _apply_label_maps(model, config)
    return config


def _apply_label_maps(model: nn.Module, config: dict[str, Any]) -> None:
    model_cfg = getattr(model, "config", None)
    if model_cfg is None or not config.get("id2label"):
        return
    model_cfg.id2label = {int(k): v for k, v in config["id2label"].items()}
    model_cfg.label2id = {v: int(k) for k, v in config["id2label"].items()}


__all__ = ["load_adapter", "matches_target", "read_adapter_config", "save_adapter"]
