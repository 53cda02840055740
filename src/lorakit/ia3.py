"""IA³'s math: a learned vector that scales a layer's output, or (feed-forward) its input.

    IA³     y = (x Wᵀ + b) · l  on key/value (l: (out, 1)),  y = (x · l) Wᵀ + b  on the
            feed-forward output layer (l: (1, in)); l starts at ones

One adapter kind behind the adapter protocol (see ``lorakit.lora``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.lora import Host, LayerSpec


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
    full_target_names = True  # PEFT wants feedforward_modules to be a subset of them

    @staticmethod
    def layer_rank(name: str, config: dict[str, Any]) -> int:
        return 0  # a vector, not a low-rank update

    @classmethod
    def attach(cls, layer: Host, name: str, spec: LayerSpec, config: dict[str, Any]) -> IA3Layer:
        old = layer.adapters[name] if name in layer.adapters else None  # noqa: SIM401 - a ModuleDict
        if isinstance(old, cls) and old.feedforward == spec.feedforward:
            return old
        return cls.add_to(layer, name, spec.feedforward)

    @classmethod
    def add_to(cls, layer: Host, name: str, feedforward: bool) -> IA3Layer:
        """A new adapter of this kind (a vector of ones) under ``name`` on ``layer``, active."""
        new = cls(layer.in_features, layer.out_features, feedforward)
        layer.register(name, new)
        return new

    @staticmethod
    def tensor_shapes(
        spec: LayerSpec, n_in: int, n_out: int, config: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """The vector an adapter file must hold for one layer: (1, in) on a feed-forward layer."""
        return {"ia3_l": (1, n_in) if spec.feedforward else (n_out, 1)}

    @staticmethod
    def peft_config(layers: list[tuple[str, Any]], bias: str) -> dict[str, Any]:
        """PEFT's IA³ config keys for these layers (target_modules aside)."""
        if bias != "none":
            raise ValueError("an IA³ adapter cannot hold trained biases (PEFT's IA3 has no bias)")
        ff = sorted(n for n, a in layers if isinstance(a, IA3Layer) and a.feedforward)
        return {"peft_type": "IA3", "feedforward_modules": ff, "init_ia3_weights": True}

    def output(self, layer: Host, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return layer.base_layer(x * self.vector().to(x.dtype))
        out = layer.base_layer(x)
        return out * self.vector().to(out.dtype)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor | None:
        return x * self.vector().to(x.dtype) if self.feedforward else None

    def add_to_rows(self, layer: Host, x: torch.Tensor, part: torch.Tensor) -> None:
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
