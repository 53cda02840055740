"""The LoRA math of one layer: formula, init, merging, dtypes, GPT-2's Conv1D."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LinearWithLoRA, LoRALayer


def _trained(layer: LinearWithLoRA, seed: int = 0) -> LinearWithLoRA:
    """Give B non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora.lora_B.copy_(torch.randn(layer.lora.lora_B.shape, generator=g))
    return layer


def test_lora_layer_init_and_shapes() -> None:
    layer = LoRALayer(10, 6, rank=4, alpha=8)
    assert layer.lora_A.shape == (4, 10) and layer.lora_B.shape == (6, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.scaling == 2.0
    assert torch.equal(layer(torch.randn(3, 10)), torch.zeros(3, 6))


def test_lora_layer_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoRALayer(4, 4, rank=0, alpha=1)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_linear_with_lora_equals_explicit_formula(dropout: float) -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = _trained(LinearWithLoRA(base, rank=4, alpha=8, dropout=dropout)).train()
    x = torch.randn(5, 10)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    dropped = nn.functional.dropout(x, dropout, training=True) if dropout else x
    A, B = layer.lora.lora_A, layer.lora.lora_B
    expected = x @ base.weight.T + base.bias + 2.0 * (dropped @ A.T @ B.T)
    torch.testing.assert_close(y, expected)


def test_wrapper_keeps_base_weight_by_reference_and_frozen() -> None:
    base = nn.Linear(4, 3)
    layer = LinearWithLoRA(base, rank=2, alpha=2)
    assert layer.base_layer.weight is base.weight
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora.lora_A.requires_grad and layer.lora.lora_B.requires_grad


def test_fresh_wrapper_equals_base() -> None:
    base = nn.Linear(8, 5)
    x = torch.randn(2, 8)
    assert torch.equal(LinearWithLoRA(base, rank=2, alpha=4)(x), base(x))


def test_merge_unmerge_exact_and_idempotent() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    w0 = base.weight.detach().clone()
    layer = _trained(LinearWithLoRA(base, rank=4, alpha=16)).eval()
    x = torch.randn(7, 16)
    y = layer(x)
    layer.merge_weights()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    merged_once = base.weight.detach().clone()
    layer.merge_weights()
    assert torch.equal(base.weight, merged_once)
    expected = w0 + 4.0 * layer.lora.lora_B @ layer.lora.lora_A
    torch.testing.assert_close(base.weight.detach(), expected)
    layer.unmerge_weights()
    layer.unmerge_weights()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_merged_layer_skips_lora_branch() -> None:
    layer = _trained(LinearWithLoRA(nn.Linear(4, 4), rank=2, alpha=2))
    layer.merge_weights()
    with torch.no_grad():
        layer.lora.lora_B.mul_(100)  # would change the output if the branch still ran
    x = torch.randn(1, 4)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_conv1d_is_wrapped_with_transposed_weight() -> None:
    torch.manual_seed(0)
    conv = Conv1D(9, 6)  # nf=out=9, nx=in=6: weight (6, 9)
    layer = _trained(LinearWithLoRA(conv, rank=3, alpha=6))
    assert (layer.in_features, layer.out_features) == (6, 9)
    x = torch.randn(2, 5, 6)
    A, B = layer.lora.lora_A, layer.lora.lora_B
    expected = x @ conv.weight + conv.bias + 2.0 * (x @ A.T @ B.T)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    layer.merge_weights()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_keeps_fp32_lora(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(dtype)
    layer = _trained(LinearWithLoRA(base, rank=4, alpha=8))
    assert layer.lora.lora_A.dtype == torch.float32
    x = torch.randn(3, 32).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = (
        x.float() @ base.weight.float().T
        + base.bias.float()
        + 2.0 * x.float() @ layer.lora.lora_A.T @ layer.lora.lora_B.T
    )
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.02)
    layer.merge_weights()
    assert base.weight.dtype == dtype
    torch.testing.assert_close(layer(x).float(), ref, atol=0.15, rtol=0.03)


def test_autocast_keeps_lora_params_fp32_and_grads_flow() -> None:
    layer = _trained(LinearWithLoRA(nn.Linear(32, 16), rank=4, alpha=8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 32))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora.lora_A.dtype == torch.float32
    assert layer.lora.lora_A.grad is not None and layer.lora.lora_A.grad.dtype == torch.float32
    assert layer.base_layer.weight.grad is None


def test_several_named_adapters_per_layer() -> None:
    layer = LinearWithLoRA(nn.Linear(4, 4), rank=2, alpha=2)
    layer.add_adapter("other", rank=3, alpha=3)
    assert set(layer.adapters) == {"default", "other"} and layer.active_adapter == "other"
    _trained(layer, seed=3)
    x = torch.randn(1, 4)
    y_other = layer(x)
    layer.active_adapter = "default"
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert not torch.allclose(y_other, layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_merge_unmerge_cycles_leave_every_weight_bit_identical(
    dtype: torch.dtype, kind: str
) -> None:
    from conftest import make_model

    from lorakit import apply_lora_to_model, merge_lora_weights, unmerge_lora_weights
    from lorakit.inject import apply_ia3_to_model
    from lorakit.state import disable_adapter

    model = make_model("bert").to(dtype)
    if kind == "ia3":
        apply_ia3_to_model(model)
    else:
        apply_lora_to_model(model, ["query", "value", "dense"], 4, 8, use_dora=kind == "dora")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        merge_lora_weights(model)
        with disable_adapter(model):  # unmerges and merges again
            pass
        merge_lora_weights(model)  # idempotent
        unmerge_lora_weights(model)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
