"""The adapter math: LoRA (with rsLoRA and DoRA), IA³, and the wrapper that adds them to a layer.

    LoRA    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ      A: (rank, in), B: (out, rank), s = alpha/rank
    rsLoRA  the same with s = alpha / sqrt(rank)
    DoRA    y = x Wᵀ + b + (m/‖W + sBA‖ − 1) · x Wᵀ + (m/‖W + sBA‖) · s · x Aᵀ Bᵀ
            m: (out,) starts at the row norms ‖W‖, so the output starts unchanged; the norm
            (per output row) is a constant for backward, as in the DoRA paper and PEFT
    IA³     y = (x Wᵀ + b) · l  on key/value (l: (out, 1)),  y = (x · l) Wᵀ + b  on the
            feed-forward output layer (l: (1, in)); l starts at ones

A starts kaiming-uniform and B at zero, so a freshly wrapped layer computes exactly what the
base layer did. The adapters of a layer live in a ``ModuleDict`` keyed by adapter name, so one
base layer can carry several; one of them (or none) is active at a time, or, in a mixed batch,
each adapter owns some rows (``lorakit.mixed``).

Every adapter kind answers the same few calls, and the wrapper knows no kind by name:
``output(layer, x)`` (the layer's output with the adapter), ``scale_input(x)`` and
``add_to_rows(layer, x, part)`` (its share of a mixed batch), ``merged(w, b)`` (the weight and
bias with it folded in), ``peft_tensors()`` (its tensors under PEFT's names) and ``stackable``
(plain LoRA, which mixed batches may gather). ``KINDS`` lists them by PEFT type; a new kind is
one class here (or a module beside it) and one line there. The frozen weight is always read as
``layer.weight()``, so any ``base_layer`` with a ``weight`` works under them.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.fused import lora_linear

DEFAULT_ADAPTER = "default"


class RowRouter(Protocol):
    """What a layer asks in a mixed batch (``lorakit.mixed.Router``): whose rows are whose."""

    routes: Any  # None outside a mixed batch

    def forward(self, layer: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor: ...


class LoRALayer(nn.Module):
    """The low-rank update ``scaling * B(A(dropout(x)))``, optionally rsLoRA- or DoRA-scaled."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank = rank
        self.use_rslora = use_rslora
        self.set_alpha(alpha)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # DoRA's magnitude: set to the base weight's row norms by ``init_magnitude``.
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features)) if use_dora else None
        # Same init as nn.Linear, so the update starts at zero but A still gets gradients.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def set_alpha(self, alpha: float) -> None:
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(self.rank) if self.use_rslora else alpha / self.rank

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``A(dropout(x))``: (*, in) -> (*, rank)."""
        return F.linear(self.dropout(self._cast(x)), self.lora_A)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        # Outside autocast, run in the (fp32) LoRA dtype even if x is bf16/fp16.
        if not torch.is_autocast_enabled(x.device.type):
            return x.to(self.lora_A.dtype)
        return x

    def scaled_B(self) -> torch.Tensor:
        """``scaling * B`` (out, rank): scaling the small matrix, not the activations."""
        return self.lora_B * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.scaled_B())  # (*, rank) -> (*, out)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor) -> None:
        """DoRA: m = ‖W + sBA‖ per output row (‖W‖ while B is zero); ``weight`` is (out, in)."""
        assert self.lora_magnitude_vector is not None
        norm = (weight.float() + self.delta_weight()).norm(p=2, dim=1)
        self.lora_magnitude_vector.copy_(norm)

    def dora_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA: m / ‖W + sBA‖ per output row, the norm detached (a constant for backward)."""
        assert self.lora_magnitude_vector is not None
        delta = self.delta_weight().detach()
        norm = (weight.float() + delta).norm(p=2, dim=1).detach()
        return self.lora_magnitude_vector / norm  # (out,)

    # -- the adapter protocol ----------------------------------------------------------------

    kind = "LORA"

    @property
    def stackable(self) -> bool:
        return not self.use_dora

    def output(self, layer: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output with this adapter: one fused autograd node where it can run."""
        base = layer.base_layer
        if not self.use_dora and _fusable(self, base.weight, x):
            xd = self.dropout(x)
            w = layer.weight()
            return lora_linear(
                x, None if xd is x else xd, w, base.bias, self.lora_A, self.lora_B, self.scaling
            )
        out = base(x)
        if self.use_dora:
            return out + self.dora_delta(layer, x, out)
        # bf16/fp16 base outside autocast, or autocast: the LoRA math in the LoRA dtype
        return out + F.linear(self.down(x), self.scaled_B()).to(out.dtype)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor | None:
        return None  # LoRA adds to the output; the shared matmul sees the input as it is

    def add_to_rows(self, layer: LinearWithLoRA, x: torch.Tensor, part: torch.Tensor) -> None:
        """Add this adapter's update to ``part`` (its rows of the shared output, a view)."""
        if self.use_dora:
            part += self.dora_delta(layer, x, part)
            return
        h = self.down(x)  # (n_rows, *, rank)
        if not h.dtype == self.lora_B.dtype == part.dtype:  # autocast, or a low-precision base
            part += F.linear(h, self.scaled_B()).to(part.dtype)
            return
        # part += s · h Bᵀ as one in-place matmul-add on the rows' (contiguous) view: two
        # kernels per adapter and layer, which is what a mixed batch multiplies.
        part.view(-1, part.shape[-1]).addmm_(
            h.reshape(-1, h.shape[-1]), self.lora_B.T, alpha=self.scaling
        )

    def dora_delta(self, layer: LinearWithLoRA, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to ``out`` (= the base layer's output for ``x``, bias included)."""
        weight = layer.weight()
        scale = self.dora_scale(weight)  # (out,)
        xd = self.dropout(self._cast(x))
        up = F.linear(F.linear(xd, self.lora_A), self.scaled_B())
        if isinstance(self.dropout, nn.Identity):  # x Wᵀ is already in out
            bias = layer.base_layer.bias
            base = out if bias is None else out - bias
        else:  # dropout changed the input: x Wᵀ of the dropped-out input
            base = F.linear(xd, weight.to(xd.dtype))
        return ((scale - 1) * base + scale * up).to(out.dtype)

    def merged(
        self, w: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W + sBA`` (DoRA: rescaled per row), fp32 math cast back; the bias unchanged."""
        new = w.float() + self.delta_weight()
        if self.use_dora:
            new = self.dora_scale(w).float()[:, None] * new
        return new.to(w.dtype), bias

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors under PEFT's key suffixes."""
        out: dict[str, torch.Tensor] = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        if self.lora_magnitude_vector is not None:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out


class IA3Layer(nn.Module):
    """IA³'s learned vector: scales the layer's output, or (feed-forward) its input."""

    def __init__(self, in_features: int, out_features: int, feedforward: bool) -> None:
        super().__init__()
        self.feedforward = feedforward
        shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape))

    def vector(self) -> torch.Tensor:
        """(in,) for a feed-forward layer, else (out,)."""
        return self.ia3_l.flatten()

    # -- the adapter protocol ----------------------------------------------------------------

    kind = "IA3"
    stackable = False

    def output(self, layer: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return layer.base_layer(x * self.vector().to(x.dtype))
        out = layer.base_layer(x)
        return out * self.vector().to(out.dtype)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor | None:
        return x * self.vector().to(x.dtype) if self.feedforward else None

    def add_to_rows(self, layer: LinearWithLoRA, x: torch.Tensor, part: torch.Tensor) -> None:
        if not self.feedforward:  # a feed-forward vector already scaled the rows' input
            part *= self.vector().to(part.dtype)

    def merged(
        self, w: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight's columns (feed-forward) or rows and bias scaled by the vector."""
        v = self.vector().float()
        if self.feedforward:
            return (w.float() * v[None, :]).to(w.dtype), bias
        scaled_bias = None if bias is None else (bias.float() * v).to(bias.dtype)
        return (w.float() * v[:, None]).to(w.dtype), scaled_bias

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}


Adapter = LoRALayer | IA3Layer
# PEFT type -> the adapter class that implements it (AdaLoRA joins here).
KINDS: dict[str, type[Adapter]] = {LoRALayer.kind: LoRALayer, IA3Layer.kind: IA3Layer}


def _fusable(lora: LoRALayer, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``lora_linear`` (one autograd node, see lorakit.fused) can run this call: one
    dtype throughout and no autocast (which would choose dtypes per matmul)."""
    return x.dtype == lora.lora_A.dtype == weight.dtype and not torch.is_autocast_enabled(
        x.device.type
    )


class LinearWithLoRA(nn.Module):
    """``base_layer(x)`` plus the active adapter, around an ``nn.Linear`` or GPT-2 ``Conv1D``.

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
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.disabled = False
        self.router: RowRouter | None = None  # set for mixed-adapter batches (lorakit.multi)
        if rank is not None:
            self.add_adapter(adapter_name, rank, alpha, dropout, use_rslora, use_dora)
        self._freeze_linear()

    # -- adapters ---------------------------------------------------------------------------

    def weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the layer's own layout (a view)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _register(self, name: str, layer: Adapter) -> None:
        layer.to(self.base_layer.weight.device)
        self.adapters[name] = layer
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
        if use_dora and self.fan_in_fan_out:
            raise TypeError("DoRA on GPT-2's Conv1D layers is not implemented in lorakit")
        layer = LoRALayer(
            self.in_features, self.out_features, rank, alpha, dropout, use_rslora, use_dora
        )
        if use_dora:
            layer.init_magnitude(self.weight())
        self._register(name, layer)
        return layer

    def add_ia3(self, name: str, feedforward: bool) -> IA3Layer:
        """Add an IA³ adapter (vector of ones) under ``name`` and make it active."""
        layer = IA3Layer(self.in_features, self.out_features, feedforward)
        self._register(name, layer)
        return layer

    def adapter(self, name: str) -> Adapter:
        """The adapter called ``name``."""
        layer = self.adapters[name]
        assert isinstance(layer, (LoRALayer, IA3Layer))
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
