"""QLoRA's frozen base (Dettmers et al., 2023): 4-bit NormalFloat or int8 weights.

NF4 stores each weight as the index (4 bits) of the nearest of 16 values, the quantiles of a
standard normal rescaled to [-1, 1] with an exact zero, times its block's absmax::

    W ≈ NF4[code] · absmax_block                 blocks of 64 weights, in row-major order
    absmax ≈ fp8(c) · absmax2_group / 448 + mean  "double quantization": groups of 256 absmax,
                                                   centred on their mean, as 8-bit floats (e4m3)

That is 4 + 8/64 + 32/(64·256) ≈ 4.13 bits a weight (bf16: 16). ``int8`` stores one signed byte
a weight and an fp32 absmax per output row. ``QuantLinear`` dequantizes in the forward and
again in the backward of its matmul, so no full-precision copy of the weight outlives a call;
the LoRA beside it (``LinearWithLoRA``) stays in the compute dtype. Embeddings, LayerNorms and
the task head stay in full precision, as in the paper.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

QuantKind = Literal["nf4", "int8"]
QUANT_KINDS: tuple[str, ...] = ("nf4", "int8")
BLOCK = 64  # weights per absmax (NF4)
ABSMAX_GROUP = 256  # absmax constants per second-level constant
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def nf4_table() -> torch.Tensor:
    """The 16 NF4 values, ascending: normal quantiles for 8 positive and 7 negative levels plus
    an exact zero, normalised to [-1, 1] (the paper's asymmetric construction)."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    # The outermost quantile's probability: halfway between those of 15 and of 16 equal-mass
    # bins (1 - 1/30 and 1 - 1/32), so the table ends at a finite value: 0.9677.
    top = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    positive = normal.icdf(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.abs().max()).float()


NF4 = nf4_table()


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks of ``size``, as rows."""
    pad = -flat.numel() % size
    return F.pad(flat, (0, pad)).view(-1, size)


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (any shape) as NF4: packed codes (uint8, two a byte, the first in the high
    nibble; zero-padded to whole blocks) and the fp32 absmax of each block of 64."""
    blocks = _blocks(weight.detach().float().reshape(-1), BLOCK)
    absmax = blocks.abs().amax(1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    table = NF4.to(weight.device)
    codes = torch.bucketize(scaled, (table[1:] + table[:-1]) / 2).to(torch.uint8)
    return ((codes[:, 0::2] << 4) | codes[:, 1::2]).reshape(-1), absmax


def dequantize_nf4(
    codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The weight of ``shape`` back from ``quantize_nf4``'s codes and absmax, in ``dtype``."""
    # One lookup a byte: its (high, low) pair of values; index_select beats indexing by codes.
    pairs = _PAIRS.to(device=codes.device, dtype=dtype)
    values = torch.index_select(pairs, 0, codes.int()).view(-1, BLOCK)
    values.mul_(absmax.to(dtype)[:, None])
    return values.view(-1)[: math.prod(shape)].view(shape)


_PAIRS = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], dim=1)  # byte -> 2 values


def quantize_absmax(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """The first-level constants as 8-bit floats (e4m3), centred on their mean, in groups of
    256 with one fp32 scale each: the paper's double quantization."""
    mean = absmax.mean()
    groups = _blocks(absmax - mean, ABSMAX_GROUP)
    absmax2 = groups.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    fp8 = (groups * (FP8_MAX / absmax2[:, None])).to(torch.float8_e4m3fn)
    return {
        "absmax": fp8.view(torch.uint8).reshape(-1)[: absmax.numel()],
        "absmax2": absmax2,
        "absmax_mean": mean.reshape(1),
    }


def dequantize_absmax(
    absmax: torch.Tensor, absmax2: torch.Tensor, absmax_mean: torch.Tensor
) -> torch.Tensor:
    """The fp32 block absmax back from ``quantize_absmax``'s tensors."""
    fp8 = _blocks(absmax.view(torch.float8_e4m3fn).float(), ABSMAX_GROUP)
    values = fp8 * (absmax2[:, None] / FP8_MAX) + absmax_mean
    return values.reshape(-1)[: absmax.numel()]


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight`` (out, in) as int8 with one fp32 absmax per output row (symmetric)."""
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return {"codes": torch.round(w / scale[:, None]).to(torch.int8), "scale": scale}


def release_freed_memory() -> None:
    """Give the heap that freed full-precision weights held back to the OS (glibc's
    ``malloc_trim``): without it the process keeps their size in RSS after quantizing."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to give back this way
        pass


class _DequantLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with ``W`` dequantized in forward and again in backward, never saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear) -> Any:
        ctx.layer = layer
        ctx.bias_grad = bias is not None and bias.requires_grad
        dtype = (
            torch.get_autocast_dtype(x.device.type)
            if torch.is_autocast_enabled(x.device.type)
            else x.dtype
        )
        return F.linear(x, layer.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = g @ ctx.layer.dequantize(g.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = g.reshape(-1, g.shape[-1]).sum(0) if ctx.bias_grad else None
        return grad_x, grad_bias, None


class QuantLinear(nn.Module):
    """A frozen linear layer stored as NF4 or int8, dequantized on every call.

    ``weight`` is a property: the dequantized (out, in) tensor in ``dtype``, so the adapter
    protocol's ``layer.weight()`` and DoRA's norms read it as they read any base layer's.
    """

    quantized = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: QuantKind) -> None:
        super().__init__()
        if kind not in QUANT_KINDS:
            raise ValueError(f"quantization {kind!r} is not one of {', '.join(QUANT_KINDS)}")
        self.kind = kind
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype  # outside autocast
        if kind == "nf4":
            codes, absmax = quantize_nf4(weight)
            state = {"codes": codes, **quantize_absmax(absmax)}
        else:
            state = quantize_int8(weight)
        for name, tensor in state.items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, kind: QuantKind) -> QuantLinear:
        """From an ``nn.Linear`` or GPT-2's ``Conv1D`` (whose (in, out) weight is transposed)."""
        w, bias = cast(torch.Tensor, linear.weight), cast("torch.Tensor | None", linear.bias)
        return cls(w.T if isinstance(linear, Conv1D) else w, bias, kind)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        b = self._state()
        if self.kind == "nf4":
            absmax = dequantize_absmax(b["absmax"], b["absmax2"], b["absmax_mean"])
            return dequantize_nf4(b["codes"], absmax, (self.out_features, self.in_features), dtype)
        return b["codes"].to(dtype) * b["scale"].to(dtype)[:, None]

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._buffers.items() if v is not None}

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (what merging writes)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=self._state()["codes"].device, dtype=self.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self.bias, self)

    def stored_bytes(self) -> int:
        """Bytes of the quantized weight and its constants (the bias not counted)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.kind}"
