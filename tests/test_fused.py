"""The fused LoRA linear (lorakit.fused) against plain two-matmul LoRA, and the fast dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

from lorakit import LinearWithLoRA
from lorakit.dropout import FastDropout, use_fast_dropout
from lorakit.fused import LoRALinearFunction


def _reference(layer: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ, written out with autograd doing the backward."""
    lora = layer.lora
    weight = layer.base_layer.weight
    w = weight.T if layer.fan_in_fan_out else weight
    xd = lora.dropout(x)
    update = (xd @ lora.lora_A.T) @ lora.lora_B.T
    return F.linear(x, w, layer.base_layer.bias) + lora.scaling * update


def _grads(layer: LinearWithLoRA, x: torch.Tensor, fn: object) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # the same LoRA dropout mask for both paths
    y = fn(layer, x)  # type: ignore[operator]
    g = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * g).sum().backward()
    params = [p for p in layer.parameters() if p.requires_grad]
    out = [y.detach(), x.grad] + [p.grad.clone() for p in params]  # type: ignore[union-attr]
    layer.zero_grad(set_to_none=True)
    return out


def _layer(kind: str, bias: bool, dropout: float, rank: int = 4) -> LinearWithLoRA:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias) if kind == "linear" else Conv1D(10, 12)
    if kind == "conv1d" and not bias:
        base.bias = None  # type: ignore[assignment]
    layer = LinearWithLoRA(base, rank, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        layer.lora.lora_B.normal_()  # a nonzero update, so B's path is exercised
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(5, 12), (3, 4, 12)])
def test_fused_forward_and_gradients_equal_the_reference(
    kind: str, bias: bool, dropout: float, shape: tuple[int, ...]
) -> None:
    layer = _layer(kind, bias, dropout)
    layer.train()
    x = torch.randn(shape)
    fused = _grads(layer, x, lambda m, v: m(v))
    ref = _grads(layer, x, _reference)
    assert len(fused) == len(ref) == 4  # output, x, lora_A, lora_B
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_gradients_of_an_unfrozen_base_weight_and_bias() -> None:
    layer = _layer("linear", bias=True, dropout=0.0)
    layer.base_layer.requires_grad_(True)
    x = torch.randn(6, 12)
    fused, ref = _grads(layer, x, lambda m, v: m(v)), _grads(layer, x, _reference)
    assert len(fused) == 6  # + weight, bias
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_xd", [False, True])
def test_fused_function_passes_gradcheck_in_float64(with_xd: bool) -> None:
    torch.manual_seed(0)
    args = [torch.randn(5, 6, dtype=torch.float64, requires_grad=True)]
    args.append(torch.randn(5, 6, dtype=torch.float64, requires_grad=True) if with_xd else None)
    args += [torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(1)]
    args += [torch.randn(4, dtype=torch.float64, requires_grad=True)]
    args += [torch.randn(3, 6, dtype=torch.float64, requires_grad=True)]
    args += [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), 0.7]
    assert torch.autograd.gradcheck(LoRALinearFunction.apply, tuple(args))


def test_frozen_base_gets_no_gradient_and_eval_is_deterministic() -> None:
    layer = _layer("linear", bias=True, dropout=0.3)
    x = torch.randn(4, 12, requires_grad=True)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_fast_dropout_rate_scale_and_seeding() -> None:
    drop = FastDropout(0.1)
    x = torch.ones(400, 500)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert 0.097 < 1 - kept.float().mean().item() < 0.103  # 200,000 draws: ±0.0007 sd
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # torch's seed fixes the mask
    assert not torch.equal(drop(x), y)  # and the next call draws a new one
    drop.eval()
    assert drop(x) is x


def test_fast_dropout_gradient_is_the_mask() -> None:
    drop = FastDropout(0.5)
    x = torch.randn(64, 32, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, (y.detach() != 0).float() * 2.0)


def test_use_fast_dropout_replaces_every_plain_dropout_and_keeps_p() -> None:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.1,
    )
    model = BertForSequenceClassification(config).eval()
    before = [(n, m.p) for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    ids = torch.randint(0, 50, (2, 7))
    logits = model(input_ids=ids).logits
    assert use_fast_dropout(model) == len(before) > 0
    after = [(n, m.p) for n, m in model.named_modules() if isinstance(m, FastDropout)]
    assert after == before
    assert not model.training  # mode kept; in eval dropout is the identity, logits unchanged
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)
    assert use_fast_dropout(model) == 0  # a second call finds nothing left to replace
