"""lorakit: LoRA fine-tuning for BERT-family text classifiers, written from scratch."""

from lorakit.adapter import load_adapter, save_adapter
from lorakit.errors import LoraKitError
from lorakit.inject import apply_lora_to_model
from lorakit.lora import LinearWithLoRA, LoRALayer
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

__version__ = "0.1.0"

__all__ = [
    "LinearWithLoRA",
    "LoRALayer",
    "LoraKitError",
    "apply_lora_to_model",
    "count_lora_parameters",
    "disable_adapter",
    "format_parameter_stats",
    "get_lora_state_dict",
    "load_adapter",
    "load_lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora_weights",
    "save_adapter",
    "unmerge_lora_weights",
]
