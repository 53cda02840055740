"""The LoRA math: a low-rank update and a wrapper that adds it to a frozen linear layer.

    y = x Wᵀ + b + (alpha / rank) · dropout(x) Aᵀ Bᵀ        A: (rank, in), B: (out, rank)

A starts kaiming-uniform and B at zero, so a freshly wrapped layer computes exactly what the
base layer did. The LoRA tensors of a layer live in a ``ModuleDict`` keyed by adapter name, so
one base layer can carry several adapters; one of them (or none) is active at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

DEFAULT_ADAPTER = "default"
Routes = list[tuple[str, slice]]  # adapter name -> the batch rows it owns, grouped


class Router:
    """Shared by every layer of one model: which rows of the current batch use which adapter.

    ``routes`` is None outside a mixed batch; then each layer runs its active adapter.
    """

    def __init__(self) -> None:
        self.routes: Routes | None = None


class LoRALayer(nn.Module):
    """The low-rank update ``(alpha/rank) * B(A(dropout(x)))``."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Same init as nn.Linear, so the update starts at zero but A still gets gradients.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``A(dropout(x))``: (*, in) -> (*, rank)."""
        # Outside autocast, run in the (fp32) LoRA dtype even if x is bf16/fp16.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        return F.linear(self.dropout(x), self.lora_A)

    def scaled_B(self) -> torch.Tensor:
        """``scaling * B`` (out, rank): scaling the small matrix, not the activations."""
        return self.lora_B * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.scaled_B())  # (*, rank) -> (*, out)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


class LinearWithLoRA(nn.Module):
    """``base_layer(x) + lora(x)`` around an existing ``nn.Linear`` or GPT-2 ``Conv1D``.

    The base layer is kept by reference (its weight is not copied) under ``base_layer``, as
    in PEFT. Merging folds the active adapter into the base weight; a merged layer skips the
    LoRA branch.
    """

    def __init__(
        self,
        linear: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if not isinstance(linear, (nn.Linear, Conv1D)):
            raise TypeError(
                f"LinearWithLoRA wraps nn.Linear or Conv1D, not {type(linear).__name__}"
            )
        self.base_layer = linear
        # Conv1D stores its weight as (in, out); nn.Linear as (out, in).
        self.fan_in_fan_out = isinstance(linear, Conv1D)
        w = linear.weight
        self.in_features, self.out_features = (
            (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        )
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.disabled = False
        self.router: Router | None = None  # set for mixed-adapter batches (lorakit.multi)
        self.add_adapter(adapter_name, rank, alpha, dropout)
        self._freeze_linear()

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> LoRALayer:
        """Add a (zero-initialised) adapter under ``name`` and make it active."""
        layer = LoRALayer(self.in_features, self.out_features, rank, alpha, dropout)
        layer.to(self.base_layer.weight.device)
        self.adapters[name] = layer
        if self.merged_adapter is None:
            self.active_adapter = name
        return layer

    def adapter(self, name: str) -> LoRALayer:
        """The adapter called ``name``."""
        layer = self.adapters[name]
        assert isinstance(layer, LoRALayer)
        return layer

    @property
    def lora(self) -> LoRALayer:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.router is not None and self.router.routes is not None:
            return self._mixed(x, out, self.router.routes)
        if self.disabled or self.merged or self.active_adapter is None:
            return out
        lora = self.lora
        h = lora.down(x)  # (*, rank)
        if h.dtype != out.dtype:  # bf16/fp16 base outside autocast: keep the LoRA math in fp32
            return out + F.linear(h, lora.scaled_B()).to(out.dtype)
        # out + h (sB)ᵀ in one fused matmul-add instead of a matmul then an add.
        flat = torch.addmm(
            out.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), lora.scaled_B().T
        )
        return flat.view(out.shape)

    def _mixed(self, x: torch.Tensor, out: torch.Tensor, routes: Routes) -> torch.Tensor:
        """Each row slice gets its own adapter's update; the base matmul ran once for all.

        Rows come grouped by adapter (``routes``: adapter name -> contiguous row slice), so
        every adapter's update is two small matmuls on a view: no gather, no scatter.
        """
        if self.merged:
            raise RuntimeError("mixed-adapter batches need unmerged weights")
        for name, rows in routes:
            if name not in self.adapters:  # this adapter does not adapt this layer
                continue
            lora = self.adapter(name)
            part = out[rows]  # (n_rows, *, out), a view
            h = lora.down(x[rows])  # (n_rows, *, rank)
            part += F.linear(h, lora.scaled_B()).to(part.dtype)
        return out

    def _delta_for_base(self, name: str) -> torch.Tensor:
        delta = self.adapter(name).delta_weight()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge_weights(self) -> None:
        """Fold the active adapter into the base weight (fp32 math, cast back). Idempotent."""
        if self.merged or self.active_adapter is None:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self._delta_for_base(self.active_adapter)).to(w.dtype))
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge_weights(self) -> None:
        """Take the merged adapter back out of the base weight. Idempotent."""
        if self.merged_adapter is None:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self._delta_for_base(self.merged_adapter)).to(w.dtype))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"active={self.active_adapter!r}, merged={self.merged}"
        )
