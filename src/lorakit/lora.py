"""LoRA's math (with rsLoRA and DoRA): one adapter kind behind the adapter protocol.

    LoRA    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ      A: (rank, in), B: (out, rank), s = alpha/rank
    rsLoRA  the same with s = alpha / sqrt(rank)
    DoRA    y = x Wᵀ + b + (m/‖W + sBA‖ − 1) · x Wᵀ + (m/‖W + sBA‖) · s · x Aᵀ Bᵀ
            m: (out,) starts at the row norms ‖W‖, so the output starts unchanged; the norm
            (per output row) is a constant for backward, as in the DoRA paper and PEFT

A starts kaiming-uniform and B at zero, so a freshly wrapped layer computes exactly what the
base layer did.

Every adapter kind (this one, IA³ in ``lorakit.ia3``) answers the same few calls, and the
wrapper (``lorakit.wrapper.LinearWithLoRA``) knows no kind by name: ``tensor_shapes`` (what an
adapter file must hold for a layer), ``attach`` (put one on a layer from a file's config),
``output(layer, x)`` (the layer's output with it), ``scale_input(x)`` and
``add_to_rows(layer, x, part)`` (its share of a mixed batch, ``lorakit.mixed``),
``merged(w, b)`` (weight and bias with it folded in), ``layer_rank(name, config)`` (the rank a
file holds for a layer), ``peft_tensors()`` and
``peft_config(layers, bias)`` (PEFT's names and config keys) and ``stackable`` (plain LoRA,
which mixed batches may gather). The frozen weight is always read as ``layer.weight()``, so
any ``base_layer`` with a ``weight`` works under them. A new kind is one module like this, one
line in ``lorakit.wrapper.KINDS``, and its PEFT type accepted by ``lorakit.adapter_config``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.fused import lora_linear


class Host(Protocol):
    """The wrapped layer as an adapter sees it (``lorakit.wrapper.LinearWithLoRA``)."""

    base_layer: Any  # nn.Linear or Conv1D: ``weight``, ``bias``, callable
    adapters: nn.ModuleDict
    in_features: int
    out_features: int
    fan_in_fan_out: bool

    def weight(self) -> torch.Tensor: ...

    def register(self, name: str, adapter: nn.Module) -> None: ...


class LayerSpec(Protocol):
    """What an adapter file says of one layer (``lorakit.adapter.LayerPlan``)."""

    @property
    def name(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    @property
    def feedforward(self) -> bool: ...


def _patterned(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value, and the layers that differ from it (PEFT's ``*_pattern``)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {name: v for name, v in values.items() if v != common}


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
        """``A(dropout(x))``: (*, in) -> (*, rank), in ``x``'s dtype.

        On a bf16/fp16 base the LoRA math runs in that dtype, as autocast would run it, with
        the fp32 tensors cast on the way (their gradients come back fp32): an fp32 copy of
        every LoRA input, kept for backward, would cost more than the bf16 base saves.
        """
        return F.linear(self.dropout(x), self.lora_A.to(x.dtype))

    def up(self, h: torch.Tensor) -> torch.Tensor:
        """``scaling * B h``: (*, rank) -> (*, out), in ``h``'s dtype."""
        return F.linear(h, self.scaled_B().to(h.dtype))

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        # DoRA's norms and rescaling run in the (fp32) LoRA dtype outside autocast.
        if not torch.is_autocast_enabled(x.device.type):
            return x.to(self.lora_A.dtype)
        return x

    def scaled_B(self) -> torch.Tensor:
        """``scaling * B`` (out, rank): scaling the small matrix, not the activations."""
        return self.lora_B * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (*, rank) -> (*, out)

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
    full_target_names = False  # target_modules may be shortened to leaf names

    @staticmethod
    def layer_rank(name: str, config: dict[str, Any]) -> int:
        """The rank the adapter file holds for layer ``name``: ``rank_pattern``, else ``r``."""
        from lorakit.adapter_config import pattern_value

        return int(pattern_value(config.get("rank_pattern") or {}, name, config.get("r") or 0))

    @property
    def stackable(self) -> bool:
        return not self.use_dora

    @classmethod
    def attach(cls, layer: Host, name: str, spec: LayerSpec, config: dict[str, Any]) -> LoRALayer:
        """Put this kind under ``name`` on ``layer`` (reusing one of the same shape and flavour,
        whose tensors an optimizer may hold), as ``spec`` and the adapter config say."""
        rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
        old = layer.adapters[name] if name in layer.adapters else None  # noqa: SIM401 - a ModuleDict
        if isinstance(old, cls) and (old.rank, old.use_rslora, old.use_dora) == (
            spec.rank,
            rslora,
            dora,
        ):
            old.set_alpha(spec.alpha)
            return old
        dropout = float(config.get("lora_dropout", 0.0))
        return cls.add_to(layer, name, spec.rank, spec.alpha, dropout, rslora, dora)

    @classmethod
    def add_to(
        cls,
        layer: Host,
        name: str,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> LoRALayer:
        """A new (zero-update) adapter of this kind under ``name`` on ``layer``, made active."""
        if use_dora and layer.fan_in_fan_out:
            raise TypeError("DoRA on GPT-2's Conv1D layers is not implemented in lorakit")
        new = cls(layer.in_features, layer.out_features, rank, alpha, dropout, use_rslora, use_dora)
        if use_dora:
            new.init_magnitude(layer.weight())
        layer.register(name, new)
        return new

    @staticmethod
    def tensor_shapes(
        spec: LayerSpec, n_in: int, n_out: int, config: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """The tensors an adapter file must hold for one layer, by PEFT's key suffix."""
        shapes: dict[str, tuple[int, ...]] = {
            "lora_A.weight": (spec.rank, n_in),
            "lora_B.weight": (n_out, spec.rank),
        }
        if config.get("use_dora"):
            shapes["lora_magnitude_vector"] = (n_out,)
        return shapes

    @staticmethod
    def peft_config(layers: list[tuple[str, Any]], bias: str) -> dict[str, Any]:
        """PEFT's LoRA config keys for these layers (target_modules aside)."""
        loras = [(n, a) for n, a in layers if isinstance(a, LoRALayer)]
        flavours = {(a.use_rslora, a.use_dora) for _, a in loras}
        if len(flavours) > 1:
            raise ValueError("the model's LoRA layers mix rsLoRA/DoRA and plain LoRA")
        use_rslora, use_dora = flavours.pop()
        r, rank_pattern = _patterned({n: a.rank for n, a in loras})
        alpha, alpha_pattern = _patterned({n: a.alpha for n, a in loras})
        dropout = loras[0][1].dropout
        return {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            "bias": bias,
            "init_lora_weights": True,
            "use_rslora": use_rslora,
            "use_dora": use_dora,
        }

    def output(self, layer: Host, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output with this adapter: one fused autograd node where it can run."""
        base = layer.base_layer
        # A quantized base (QLoRA) hands the fused node its dequantizer, not a weight to keep.
        quantized = getattr(base, "quantized", False)
        w = None if quantized else layer.weight()  # the frozen weight, through its one accessor
        dtype = base.compute_dtype if quantized else w.dtype  # type: ignore[union-attr]
        if not self.use_dora and _fusable(self, dtype, x):
            xd = self.dropout(x)
            return lora_linear(
                x,
                None if xd is x else xd,
                w,
                base.bias,
                self.lora_A,
                self.lora_B,
                self.scaling,
                base.dequantize if quantized else None,
            )
        out = base(x)
        if self.use_dora:
            return out + self.dora_delta(layer, x, out)
        # bf16/fp16 base outside autocast, or autocast: the LoRA math in the input's dtype
        return out + self.up(self.down(x)).to(out.dtype)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor | None:
        return None  # LoRA adds to the output; the shared matmul sees the input as it is

    def add_to_rows(self, layer: Host, x: torch.Tensor, part: torch.Tensor) -> None:
        """Add this adapter's update to ``part`` (its rows of the shared output, a view)."""
        if self.use_dora:
            part += self.dora_delta(layer, x, part)
            return
        h = self.down(x)  # (n_rows, *, rank)
        if not h.dtype == self.lora_B.dtype == part.dtype:  # autocast, or a low-precision base
            part += self.up(h).to(part.dtype)
            return
        # part += s · h Bᵀ as one in-place matmul-add on the rows' (contiguous) view: two
        # kernels per adapter and layer, which is what a mixed batch multiplies.
        part.view(-1, part.shape[-1]).addmm_(
            h.reshape(-1, h.shape[-1]), self.lora_B.T, alpha=self.scaling
        )

    def dora_delta(self, layer: Host, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to ``out`` (= the base layer's output for ``x``, bias included)."""
        weight = layer.weight()
        scale = self.dora_scale(weight)  # (out,)
        xd = self.dropout(self._cast(x))
        up = F.linear(F.linear(xd, self.lora_A.to(xd.dtype)), self.scaled_B().to(xd.dtype))
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


def _fusable(lora: LoRALayer, weight_dtype: torch.dtype, x: torch.Tensor) -> bool:
    """Whether ``lora_linear`` (one autograd node, see lorakit.fused) can run this call: one
    dtype throughout and no autocast (which would choose dtypes per matmul)."""
    return x.dtype == lora.lora_A.dtype == weight_dtype and not torch.is_autocast_enabled(
        x.device.type
    )
