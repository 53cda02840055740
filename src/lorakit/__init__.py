"""lorakit: LoRA fine-tuning for BERT-family text classifiers, written from scratch.

The names below load on first use, so ``lorakit --help`` and commands that set up the
process before torch starts (``lorakit serve``) do not pay for importing torch up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.adapter import load_adapter, save_adapter
    from lorakit.errors import LoraKitError
    from lorakit.inject import apply_ia3_to_model, apply_lora_to_model, quantize_base
    from lorakit.lora import LoRALayer
    from lorakit.state import (
        count_lora_parameters,
        disable_adapter,
        format_parameter_stats,
        get_lora_state_dict,
        load_lora_state_dict,
        mark_only_lora_as_trainable,
        merge_lora_weights,
        unmerge_lora_weights,
    )
    from lorakit.wrapper import LinearWithLoRA

__version__ = "0.1.0"

_API = {
    "LinearWithLoRA": "lorakit.wrapper",
    "LoRALayer": "lorakit.lora",
    "LoraKitError": "lorakit.errors",
    "apply_ia3_to_model": "lorakit.inject",
    "apply_lora_to_model": "lorakit.inject",
    "count_lora_parameters": "lorakit.state",
    "disable_adapter": "lorakit.state",
    "format_parameter_stats": "lorakit.state",
    "get_lora_state_dict": "lorakit.state",
    "load_adapter": "lorakit.adapter",
    "load_lora_state_dict": "lorakit.state",
    "mark_only_lora_as_trainable": "lorakit.state",
    "merge_lora_weights": "lorakit.state",
    "quantize_base": "lorakit.inject",
    "save_adapter": "lorakit.adapter",
    "unmerge_lora_weights": "lorakit.state",
}
__all__ = [
    "LinearWithLoRA",
    "LoRALayer",
    "LoraKitError",
    "apply_ia3_to_model",
    "apply_lora_to_model",
    "count_lora_parameters",
    "disable_adapter",
    "format_parameter_stats",
    "get_lora_state_dict",
    "load_adapter",
    "load_lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora_weights",
    "quantize_base",
    "save_adapter",
    "unmerge_lora_weights",
]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
