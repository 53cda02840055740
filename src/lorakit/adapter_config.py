"""``adapter_config.json``: what lorakit reads, writes and refuses in PEFT's adapter configs.

lorakit implements PEFT's ``LORA`` (plain, rsLoRA, DoRA, per-layer ranks), ``IA3`` and
``ADALORA``. Anything whose math differs — initialisations that rewrite the base weights on load
(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), the newer LoRA extensions — is refused with one line
rather than loaded into wrong logits. Keys a newer PEFT adds at their default values load
silently.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from lorakit.atomic import readable
from lorakit.errors import LoraKitError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
LORAKIT_NAME = "lorakit.json"  # lorakit's own facts (labels, task): PEFT has no key for them

# Keys of PEFT's LoRA and IA³ configs that lorakit reads, or that cannot change the math.
KNOWN_KEYS = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
    "modules_to_save", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "revision",
    "auto_mapping", "peft_version", "megatron_core", "runtime_config", "eva_config",
    "corda_config", "qalora_group_size", "ensure_weight_tying", "feedforward_modules",
    "init_ia3_weights",
    # AdaLoRA's schedule (training only: a finished adapter's math reads init_r and the masks)
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
    "total_step",
    # lorakit's own, in adapter_config.json before lorakit.json existed
    "id2label", "label2id", "num_labels", "task", "lorakit_version", "max_length",
    "text_columns", "metrics",
}  # fmt: skip
# Keys that change the math when set; lorakit does not implement them.
REFUSED_WHEN_SET = {
    "lora_bias": "LoRA biases (lora_bias)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters (LoRA on parameters)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "exclude_modules": "exclude_modules",
    "megatron_config": "Megatron layers",
    "loftq_config": "LoftQ",
    "lora_ga_config": "LoRA-GA",
}
# init_lora_weights values that rewrite the base weights when PEFT loads the adapter.
REWRITES_BASE = re.compile(r"^(pissa.*|olora|corda|loftq|lora_ga)$")
KINDS = ("LORA", "IA3", "ADALORA")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraKitError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LoraKitError(f"{path} must hold a JSON object")
    return data


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def _fraction(v: Any) -> bool:
    return _number(v) and 0 <= v < 1


def _names(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _require(path: Path, config: dict[str, Any], key: str, check: Any, what: str) -> None:
    """A present (non-null) ``key`` must pass ``check``; the error names the field."""
    if config.get(key) is not None and not check(config[key]):
        raise LoraKitError(f"{path}: {key} must be {what}, not {config[key]!r}")


def _check_lorakit(path: Path, meta: dict[str, Any]) -> None:
    """lorakit.json's fields that the loaders compute with."""
    _require(path, meta, "max_length", _positive_int, "a positive whole number")
    _require(path, meta, "num_labels", _positive_int, "a positive whole number")
    _require(path, meta, "text_columns", _names, "a list of column names")
    for key in ("id2label", "label2id"):
        _require(path, meta, key, lambda v: isinstance(v, dict), "an object")
    labels = meta.get("id2label") or {}
    if not all(str(k).isdigit() and isinstance(v, str) for k, v in labels.items()):
        raise LoraKitError(f"{path}: id2label must map label ids (0, 1, ...) to names")


def _check_lora(path: Path, config: dict[str, Any]) -> None:
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise LoraKitError(f"{path} lacks the required key {key!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and REWRITES_BASE.match(init.lower()):
        raise LoraKitError(
            f"{path}: init_lora_weights={init!r} rewrites the base model's weights when PEFT "
            "loads it; lorakit does not implement that and would give wrong logits"
        )
    _require(path, config, "r", _positive_int, "a positive whole number")
    _require(path, config, "lora_alpha", _number, "a number")
    _require(path, config, "lora_dropout", _fraction, "a number in [0, 1)")
    for key, check in (("rank_pattern", _positive_int), ("alpha_pattern", _number)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(check(v) for v in patterns.values()):
            raise LoraKitError(f"{path}: {key} must be a mapping of layer patterns to numbers")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise LoraKitError(f"{path}: bias must be none, all or lora_only, not {config['bias']!r}")
    if config.get("use_dora") and config.get("fan_in_fan_out"):
        raise LoraKitError(f"{path}: DoRA on GPT-2's Conv1D layers is not implemented in lorakit")


def _check_adalora(path: Path, config: dict[str, Any]) -> None:
    """AdaLoRA: ``init_r`` (the rank every layer starts at, the update's divisor) and one
    boolean per initial triplet in each ``rank_pattern`` entry (``<layer>.lora_E``)."""
    for key in ("init_r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise LoraKitError(f"{path} lacks the required key {key!r}")
    _require(path, config, "init_r", _positive_int, "a positive whole number")
    _require(path, config, "lora_alpha", _number, "a number")
    _require(path, config, "lora_dropout", _fraction, "a number in [0, 1)")
    patterns = config.get("rank_pattern") or {}
    masks_ok = isinstance(patterns, dict) and all(
        isinstance(v, list)
        and len(v) == config["init_r"]
        and all(isinstance(m, bool) for m in v)
        and k.endswith(".lora_E")
        for k, v in patterns.items()
    )
    if not masks_ok:
        raise LoraKitError(
            f"{path}: rank_pattern must map <layer>.lora_E to init_r={config['init_r']} booleans"
        )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise LoraKitError(f"{path}: bias must be none, all or lora_only, not {config['bias']!r}")


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` checked, with ``lorakit.json``'s keys (labels, task) merged in.

    Raises:
        LoraKitError: missing or unreadable, not LoRA/IA³/AdaLoRA, or using a feature lorakit
            lacks.
    """
    directory = readable(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise LoraKitError(f"adapter directory {directory} does not exist")
    if not path.is_file():
        raise LoraKitError(f"{directory} is not an adapter directory: {CONFIG_NAME} is missing")
    config = read_json(path)
    kind = config.get("peft_type")
    if kind not in KINDS:
        raise LoraKitError(
            f"{path} is not a LoRA, IA³ or AdaLoRA adapter config (peft_type {kind!r})"
        )
    if kind == "LORA":
        _check_lora(path, config)
    elif kind == "ADALORA":
        _check_adalora(path, config)
    elif "target_modules" not in config:
        raise LoraKitError(f"{path} lacks the required key 'target_modules'")
    _require(path, config, "target_modules", _names, "a list of module names or a regex")
    _require(path, config, "modules_to_save", _names, "a list of module names")
    for key, feature in REFUSED_WHEN_SET.items():
        if config.get(key):
            raise LoraKitError(f"{path}: {feature} is not implemented in lorakit ({key} is set)")
    unknown = sorted(k for k in set(config) - KNOWN_KEYS - set(REFUSED_WHEN_SET) if config[k])
    if unknown:
        logger.warning("%s: ignoring unknown keys %s", path, ", ".join(unknown))
    _check_lorakit(path, config)  # the same keys in adapter_config.json of older lorakits
    if (directory / LORAKIT_NAME).is_file():
        meta = read_json(directory / LORAKIT_NAME)
        _check_lorakit(directory / LORAKIT_NAME, meta)
        config.update(meta)
    return config


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's lookup: the first key that full-matches a dotted suffix of ``name``, else default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def plain_lora_config(config: dict[str, Any]) -> dict[str, Any]:
    """An rsLoRA config rewritten as plain LoRA with the same scaling (alpha' = alpha·sqrt(r)),
    for runtimes that ignore ``use_rslora``."""
    if not config.get("use_rslora"):
        return dict(config)
    r, alpha = config["r"], config["lora_alpha"]
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    # Each layer's alpha' depends on its own rank, so every layer whose rank or alpha differs
    # from the defaults gets its own alpha_pattern entry.
    new_alphas = {
        key: pattern_value(alphas, key, alpha) * pattern_value(ranks, key, r) ** 0.5
        for key in {*ranks, *alphas}
    }
    return {
        **config,
        "use_rslora": False,
        "lora_alpha": alpha * r**0.5,
        "alpha_pattern": new_alphas,
    }
