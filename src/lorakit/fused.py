"""The LoRA linear as one autograd function: the frozen matmul plus a sliver.

    y = x Wᵀ + b + s · (xd Aᵀ) Bᵀ        xd = dropout(x), or x itself without LoRA dropout

Autograd over the plain formula records a matmul, a scale, a matmul and an add in forward and
twice as many nodes in backward, each with its own kernels, copies of ``B`` scaled and an extra
full-size add for the two input gradients. Here forward is three kernels (the base ``addmm``,
``h = xd Aᵀ``, and ``y += s·h Bᵀ`` in place), and backward keeps only ``x`` (or ``xd``) and the
small ``h`` and writes each gradient once:

    gh      = g B                    (N, r)
    grad x  = g W  (+ s · gh A  when xd is x, accumulated in place: no second (N, in) tensor)
    grad xd = s · gh A               (only with LoRA dropout; autograd routes it through the mask)
    grad A  = s · ghᵀ xd             (r, in)
    grad B  = s · gᵀ h               (out, r)

The frozen ``W`` and ``b`` get gradients only if they require them (they do not in lorakit,
but the function stays correct if a caller unfreezes them). A quantized base (QLoRA) passes
``dequantize`` instead of ``W``: the weight is dequantized in forward and again in backward,
so the node keeps no full-precision copy of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Dequantize = Callable[[torch.dtype], torch.Tensor]  # dtype -> the (out, in) weight


class LoRALinearFunction(torch.autograd.Function):
    """``lora_linear``'s forward and hand-written backward, on 2-D inputs."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,  # (N, in)
        xd: torch.Tensor | None,  # (N, in), dropout(x); None when there is no LoRA dropout
        weight: torch.Tensor | None,  # (out, in), possibly a transposed view (GPT-2's Conv1D)
        bias: torch.Tensor | None,  # (out,)
        lora_a: torch.Tensor,  # (r, in)
        lora_b: torch.Tensor,  # (out, r)
        scaling: float,
        dequantize: Dequantize | None = None,  # instead of ``weight``, for a quantized base
    ) -> torch.Tensor:
        down_in = x if xd is None else xd
        w = weight if weight is not None else dequantize(x.dtype)  # type: ignore[misc]
        out = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
        del w
        h = down_in @ lora_a.t()  # (N, r)
        out.addmm_(h, lora_b.t(), alpha=scaling)
        x_for_w = x if weight is not None and weight.requires_grad else None  # frozen: no x
        ctx.save_for_backward(x_for_w, down_in, h, weight, lora_a, lora_b)
        ctx.dequantize = dequantize
        ctx.scaling = scaling
        ctx.has_xd = xd is not None
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, down_in, h, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        need = ctx.needs_input_grad
        g = g.contiguous()
        gh = g @ lora_b  # (N, r), without s: s goes on the small products below
        grad_x = grad_xd = grad_w = grad_bias = grad_a = grad_b = None
        if need[0]:
            grad_x = g @ (weight if weight is not None else ctx.dequantize(g.dtype))  # (N, in)
            if not ctx.has_xd:
                grad_x.addmm_(gh, lora_a, alpha=s)
        if ctx.has_xd and need[1]:
            grad_xd = torch.mm(gh, lora_a).mul_(s)
        if need[2]:
            grad_w = g.t() @ x
        if ctx.has_bias and need[3]:
            grad_bias = g.sum(0)
        if need[4]:
            grad_a = torch.mm(gh.t(), down_in).mul_(s)
        if need[5]:
            grad_b = torch.mm(g.t(), h).mul_(s)
        return grad_x, grad_xd, grad_w, grad_bias, grad_a, grad_b, None, None


def lora_linear(
    x: torch.Tensor,
    xd: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dequantize: Dequantize | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + s·(xd Aᵀ)Bᵀ`` for inputs of any leading shape (*, in) -> (*, out); ``W``
    is ``weight``, or ``dequantize(dtype)`` for a quantized base (then ``weight`` is None)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    flat_d = None if xd is None else xd.reshape(-1, xd.shape[-1])
    out = LoRALinearFunction.apply(flat, flat_d, weight, bias, lora_a, lora_b, scaling, dequantize)
    return out.view(*lead, out.shape[-1])
