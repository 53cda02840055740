"""Adapter directories in Hugging Face PEFT's layout: ``adapter_config.json`` + safetensors.

Only json and safetensors are ever read, never pickle. Tensor keys are
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and
``base_model.model.<head>.<param>``, exactly what ``peft.PeftModel`` writes and reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.atomic import atomic_dir
from lorakit.errors import LoraKitError
from lorakit.inject import find_heads, find_target_modules, lora_layers, matches_target
from lorakit.lora import DEFAULT_ADAPTER, LinearWithLoRA
from lorakit.state import get_lora_state_dict

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
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
}
# Features of PEFT's LoRA that change the math; an adapter using them would load wrong.
UNSUPPORTED = {"use_dora": True, "use_rslora": True, "lora_bias": True}


def _target_spec(model: nn.Module) -> list[str]:
    """Shortest target list that selects exactly the wrapped layers: leaf names, else full names."""
    wrapped = [name for name, _ in lora_layers(model)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    if set(find_target_modules(model, leaves)) == set(wrapped):
        return leaves
    return sorted(wrapped)


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    task: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the active adapter and the task head as a PEFT-compatible directory.

    The directory is written beside its destination and renamed into place, so an
    interrupted save never leaves a half-written adapter where a good one was.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise LoraKitError("the model has no LoRA layers to save")
    lora = layers[0][1].lora
    label_cfg = getattr(model, "config", None)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout.p if isinstance(lora.dropout, nn.Dropout) else 0.0,
        "target_modules": _target_spec(model),
        "modules_to_save": find_heads(model),
        "base_model_name_or_path": base_model_name_or_path
        or getattr(label_cfg, "_name_or_path", None),
        "bias": "none",
        "fan_in_fan_out": layers[0][1].fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "task": task,
    }
    if label_cfg is not None:
        config["num_labels"] = label_cfg.num_labels
        config["id2label"] = {str(k): v for k, v in label_cfg.id2label.items()}
        config["label2id"] = dict(label_cfg.label2id)
    config.update(extra or {})
    state = {
        PREFIX + k: v.detach().to("cpu").contiguous() for k, v in get_lora_state_dict(model).items()
    }

    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json``; unknown keys are a warning, not a failure."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise LoraKitError(f"adapter directory {directory} does not exist")
    if not path.is_file():
        raise LoraKitError(f"{directory} is not an adapter directory: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraKitError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise LoraKitError(f"{path} is not a LoRA adapter config (peft_type must be 'LORA')")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise LoraKitError(f"{path} lacks the required key {key!r}")
    for key, bad in UNSUPPORTED.items():
        if config.get(key) == bad:
            raise LoraKitError(f"{path}: {key}={bad} is not supported by lorakit")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraKitError(f"{path}: per-layer rank_pattern/alpha_pattern are not supported")
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        logger.warning("%s: ignoring unknown keys %s", path, ", ".join(unknown))
    return config


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by model-relative names (PEFT's prefix removed)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise LoraKitError(f"{path} is missing (lorakit reads only safetensors, never pickle)")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LoraKitError(f"{path} is not a readable safetensors file: {e}") from None
    return {k.removeprefix(PREFIX).replace(".modules_to_save.", "."): v for k, v in raw.items()}


def _check_fits(
    model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> list[str]:
    """Check every tensor against the model before anything changes; return the target names."""
    targets = find_target_modules(model, config["target_modules"])
    r = int(config["r"])
    heads = {k: tuple(v.shape) for k, v in get_lora_state_dict(model).items() if ".lora_" not in k}
    for name in targets:
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
                raise LoraKitError(f"adapter has no tensor for {key!r} (target of the model)")
            if tuple(state[key].shape) != shape:
                raise LoraKitError(
                    f"adapter tensor {key!r} has shape {tuple(state[key].shape)}, the model "
                    f"expects {shape}: was this adapter trained on another base model?"
                )
    target_set = set(targets)
    for key, value in state.items():
        if ".lora_" in key:
            if key.rsplit(".lora_", 1)[0] not in target_set:
                raise LoraKitError(f"adapter tensor {key!r} matches no target layer of the model")
        elif key not in heads:
            raise LoraKitError(f"adapter tensor {key!r} has no place in the model")
        elif tuple(value.shape) != heads[key]:
            raise LoraKitError(
                f"adapter head tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{heads[key]} (num_labels differs?)"
            )
    return targets


@torch.no_grad()
def load_adapter(
    model: nn.Module, directory: str | Path, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, Any]:
    """Inject LoRA as the adapter's config says and load its tensors and head into ``model``.

    Everything is checked first: an adapter that does not fit raises ``LoraKitError`` naming
    the first mismatch and leaves the model exactly as it was.

    Returns:
        The adapter's config (with its label maps, task and metrics when lorakit wrote it).
    """
    config = read_adapter_config(directory)
    state = read_adapter_weights(directory)
    targets = _check_fits(model, config, state)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    dropout = float(config.get("lora_dropout", 0.0))
    for name in targets:
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
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, wrapper)
            lora = wrapper.lora
        lora.lora_A.copy_(state[f"{name}.lora_A.weight"])
        lora.lora_B.copy_(state[f"{name}.lora_B.weight"])
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
