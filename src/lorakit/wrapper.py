"""The wrapper that adds adapters to a layer: ``LinearWithLoRA`` around ``nn.Linear`` / Conv1D.

The adapters of a layer live in a ``ModuleDict`` keyed by adapter name, so one base layer can
carry several; one of them (or none) is active at a time, or, in a mixed batch, each adapter
owns some rows (``lorakit.mixed``). The wrapper dispatches through the adapter protocol
(``lorakit.lora``) and knows no kind by name; ``KINDS`` maps PEFT's types to the kinds.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adalora import AdaLoRALayer
from lorakit.errors import LoraKitError
from lorakit.ia3 import IA3Layer
from lorakit.lora import LoRALayer
from lorakit.quant import QuantLinear

DEFAULT_ADAPTER = "default"


class RowRouter(Protocol):
    """What a layer asks in a mixed batch (``lorakit.mixed.Router``): whose rows are whose."""

    routes: Any  # None outside a mixed batch

    def forward(self, layer: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor: ...


Adapter = LoRALayer | IA3Layer | AdaLoRALayer
# PEFT type -> the adapter class that implements it.
KINDS: dict[str, type[Adapter]] = {
    LoRALayer.kind: LoRALayer,
    IA3Layer.kind: IA3Layer,
    AdaLoRALayer.kind: AdaLoRALayer,
}


class LinearWithLoRA(nn.Module):
    """``base_layer(x)`` plus the active adapter, around an ``nn.Linear``, GPT-2 ``Conv1D`` or
    a quantized ``QuantLinear`` (QLoRA).

    The base layer is kept by reference (its weight is not copied) under ``base_layer``, as
    in PEFT. Merging folds the active adapter into the base weight; a merged layer skips the
    adapter branch. ``rank=None`` wraps without adding an adapter.
    """

    def __init__(
        self,
        linear: nn.Module,
        rank: int | None,
        alpha: float = 8.0,
        dropout: float = 0.0,
        adapter_name: str = DEFAULT_ADAPTER,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(linear, (nn.Linear, Conv1D, QuantLinear)):
            raise TypeError(
                f"LinearWithLoRA wraps nn.Linear, Conv1D or QuantLinear, not "
                f"{type(linear).__name__}"
            )
        self.base_layer = linear
        # Conv1D stores its weight as (in, out); nn.Linear and QuantLinear as (out, in).
        self.fan_in_fan_out = isinstance(linear, Conv1D)
        if isinstance(linear, QuantLinear):
            self.in_features, self.out_features = linear.in_features, linear.out_features
        else:
            w = linear.weight
            self.in_features, self.out_features = (
                (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
            )
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.disabled = False
        self.router: RowRouter | None = None  # set for mixed-adapter batches (lorakit.multi)
        if rank is not None:
            self.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, use_dora)
        self._freeze_linear()

    # -- adapters ---------------------------------------------------------------------------

    def weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the layer's own layout (a view; for a
        quantized base, a dequantized copy)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, QuantLinear)

    def register(self, name: str, adapter: nn.Module) -> None:
        """Keep ``adapter`` under ``name`` on the base weight's device; active unless merged."""
        tensors = [*self.base_layer.buffers(), *self.base_layer.parameters()]
        adapter.to(tensors[0].device)
        self.adapters[name] = adapter
        if self.merged_adapter is None:
            self.active_adapter = name

    def add_adapter(
        self,
        name: str,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> LoRALayer:
        """Add a (zero-update) LoRA adapter under ``name`` and make it active."""
        return LoRALayer.add_to(self, name, rank, alpha, dropout, use_rslora, use_dora)

    def add_ia3(self, name: str, feedforward: bool) -> IA3Layer:
        """Add an IA³ adapter (vector of ones) under ``name`` and make it active."""
        return IA3Layer.add_to(self, name, feedforward)

    def adapter(self, name: str) -> Adapter:
        """The adapter called ``name``."""
        layer = self.adapters[name]
        assert isinstance(layer, (LoRALayer, IA3Layer, AdaLoRALayer))
        return layer

    @property
    def lora(self) -> Adapter:
        """The active adapter."""
        if self.active_adapter is None:
            raise RuntimeError("no active adapter")
        return self.adapter(self.active_adapter)

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def _freeze_linear(self) -> None:
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None and self.router.routes is not None:
            return self.router.forward(self, x)
        if self.disabled or self.merged or self.active_adapter is None:
            return self.base_layer(x)
        return self.lora.output(self, x)

    # -- merging ----------------------------------------------------------------------------

    @torch.no_grad()
    def merge_weights(self) -> None:
        """Fold the active adapter into the base weight (fp32 math, cast back). Idempotent.

        The original weight (and bias) is kept aside and unmerging puts it back bit for bit, in
        every dtype: subtracting ``sBA`` again would round differently from the addition
        (by an ulp in bf16), and a model merged and unmerged many times (``disable_adapter``)
        would drift. The cost is one copy of each merged layer's weight while merged.
        """
        if self.merged or self.active_adapter is None:
            return
        if self.quantized:
            raise LoraKitError(
                "cannot merge an adapter into a quantized base layer: dequantize it first "
                "(lorakit merge and export write the dequantized base plus the adapter)"
            )
        w, bias = self.weight(), self.base_layer.bias
        self._unmerged = (w.detach().clone(), None if bias is None else bias.detach().clone())
        new_w, new_bias = self.lora.merged(w, bias)
        w.copy_(new_w)
        if bias is not None and new_bias is not None:
            bias.copy_(new_bias)
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge_weights(self) -> None:
        """Take the merged adapter back out of the base weight. Idempotent."""
        if self.merged_adapter is None or self._unmerged is None:
            return
        weight, bias = self._unmerged
        self.weight().copy_(weight)
        if bias is not None and self.base_layer.bias is not None:
            self.base_layer.bias.copy_(bias)
        self._unmerged = None
        self.merged_adapter = None

    def remove_adapter(self, name: str) -> None:
        """Drop the adapter ``name`` (unmerged first); another one, if any, becomes active."""
        if self.merged_adapter == name:
            self.unmerge_weights()
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"active={self.active_adapter!r}, merged={self.merged}"
        )
