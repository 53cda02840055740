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
each adapter owns some rows (``Router``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.fused import lora_linear

DEFAULT_ADAPTER = "default"
Routes = list[tuple[str, slice]]  # adapter name -> the batch rows it owns, grouped


class Router:
    """Shared by every layer of one model: which rows of the current batch use which adapter.

    ``routes`` is None outside a mixed batch; then each layer runs its active adapter.
    """

    def __init__(self) -> None:
        self.routes: Routes | None = None
        # Bumped whenever an adapter is loaded or removed: layers rebuild their stacks.
        self.generation = 0


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

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}


Adapter = LoRALayer | IA3Layer
# A layer's plain-LoRA adapters for a mixed batch: name -> position, A as (K+1, r, in) and
# s·B as (K+1, out, r), ranks zero-padded to the largest, the last entry zero (for the rows
# of adapters that do not adapt this layer).
Stack = tuple[dict[str, int], torch.Tensor, torch.Tensor]


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
        self.router: Router | None = None  # set for mixed-adapter batches (lorakit.multi)
        # (router generation, adapter names) -> the adapters stacked for gathered mixed batches
        self._stack: tuple[tuple[int, tuple[str, ...]], Stack | None] | None = None
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
            return self._mixed(x, self.router.routes)
        if self.disabled or self.merged or self.active_adapter is None:
            return self.base_layer(x)
        adapter = self.lora
        if isinstance(adapter, IA3Layer):
            return self._ia3(adapter, x)
        if not adapter.use_dora and self._fusable(adapter, x):
            xd = adapter.dropout(x)
            return lora_linear(
                x,
                None if xd is x else xd,
                self.weight(),
                self.base_layer.bias,
                adapter.lora_A,
                adapter.lora_B,
                adapter.scaling,
            )
        out = self.base_layer(x)
        if adapter.use_dora:
            return out + self._dora_delta(adapter, x, out)
        # bf16/fp16 base outside autocast, or autocast: the LoRA math in the LoRA dtype
        return out + F.linear(adapter.down(x), adapter.scaled_B()).to(out.dtype)

    def _fusable(self, adapter: LoRALayer, x: torch.Tensor) -> bool:
        """Whether ``lora_linear`` (one autograd node, see lorakit.fused) can run this call:
        one dtype throughout and no autocast (which would choose dtypes per matmul)."""
        return (
            x.dtype == adapter.lora_A.dtype == self.base_layer.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _ia3(self, adapter: IA3Layer, x: torch.Tensor) -> torch.Tensor:
        if adapter.feedforward:
            return self.base_layer(x * adapter.vector().to(x.dtype))
        out = self.base_layer(x)
        return out * adapter.vector().to(out.dtype)

    def _dora_delta(self, lora: LoRALayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to ``out`` (= base_layer(x), bias included)."""
        weight = self.weight()
        scale = lora.dora_scale(weight)  # (out,)
        xd = lora.dropout(lora._cast(x))
        up = F.linear(F.linear(xd, lora.lora_A), lora.scaled_B())
        if isinstance(lora.dropout, nn.Identity):  # x Wᵀ is already in out
            bias = self.base_layer.bias
            base = out if bias is None else out - bias
        else:  # dropout changed the input: x Wᵀ of the dropped-out input
            base = F.linear(xd, weight.to(xd.dtype))
        return ((scale - 1) * base + scale * up).to(out.dtype)

    def _mixed(self, x: torch.Tensor, routes: Routes) -> torch.Tensor:
        """Each row slice gets its own adapter; the base matmul runs once for all rows.

        Rows come grouped by adapter (``routes``: adapter name -> contiguous row slice), so
        every adapter's update works on a view: no gather, no scatter. A feed-forward IA³
        adapter scales its rows' input before the shared matmul.
        """
        if self.merged:
            raise RuntimeError("mixed-adapter batches need unmerged weights")
        if len(routes) > 1 and not torch.is_grad_enabled() and not self.training:
            stack = self._stacked()
            if stack is not None and stack[1].dtype == x.dtype:
                return self._gathered(x, routes, stack)
        scaled_input = x
        for name, rows in routes:
            adapter = self.adapter(name) if name in self.adapters else None
            if isinstance(adapter, IA3Layer) and adapter.feedforward:
                if scaled_input is x:
                    scaled_input = x.clone()
                scaled_input[rows] *= adapter.vector().to(x.dtype)
        out = self.base_layer(scaled_input)
        for name, rows in routes:
            if name not in self.adapters:  # this adapter does not adapt this layer
                continue
            adapter = self.adapter(name)
            part = out[rows]  # (n_rows, *, out), a view
            if isinstance(adapter, IA3Layer):
                if not adapter.feedforward:
                    part *= adapter.vector().to(part.dtype)
            elif adapter.use_dora:
                part += self._dora_delta(adapter, x[rows], part)
            else:
                h = adapter.down(x[rows])  # (n_rows, *, rank)
                if not h.dtype == adapter.lora_B.dtype == part.dtype:  # autocast, or low base
                    part += F.linear(h, adapter.scaled_B()).to(part.dtype)
                    continue
                # part += s · h Bᵀ as one in-place matmul-add on the rows' (contiguous) view:
                # two kernels per adapter and layer, which is what a mixed batch multiplies.
                part.view(-1, part.shape[-1]).addmm_(
                    h.reshape(-1, h.shape[-1]), adapter.lora_B.T, alpha=adapter.scaling
                )
        return out

    def _stacked(self) -> Stack | None:
        """This layer's adapters stacked (``Stack``), or None if one is not plain LoRA;
        rebuilt when the router's generation or the adapter names change."""
        key = (self.router.generation if self.router else -1, tuple(self.adapters))
        if self._stack is not None and self._stack[0] == key:
            return self._stack[1]
        adapters = [(n, a) for n, a in self.adapters.items()]
        stack: Stack | None = None
        if adapters and all(isinstance(a, LoRALayer) and not a.use_dora for _, a in adapters):
            loras = [a for _, a in adapters if isinstance(a, LoRALayer)]
            rank = max(a.rank for a in loras)
            first = loras[0].lora_A
            a_stack = first.new_zeros((len(loras) + 1, rank, self.in_features))
            b_stack = first.new_zeros((len(loras) + 1, self.out_features, rank))
            with torch.no_grad():
                for i, a in enumerate(loras):
                    a_stack[i, : a.rank] = a.lora_A
                    b_stack[i, :, : a.rank] = a.scaled_B()
            stack = ({n: i for i, (n, _) in enumerate(adapters)}, a_stack, b_stack)
        self._stack = (key, stack)
        return stack

    def _gathered(self, x: torch.Tensor, routes: Routes, stack: Stack) -> torch.Tensor:
        """A mixed batch in four kernels whatever the number of adapters (Punica's gathered
        LoRA): each row's A and s·B are gathered from the stack, then one batched matmul
        down and one batched matmul-add up. The same FLOPs as one adapter's update."""
        positions, a_stack, b_stack = stack
        n = x.shape[0]
        index = [a_stack.shape[0] - 1] * n
        for name, rows in routes:
            index[rows] = [positions.get(name, a_stack.shape[0] - 1)] * (rows.stop - rows.start)
        idx = torch.tensor(index, device=x.device)
        out = self.base_layer(x)
        x3 = x.reshape(n, -1, x.shape[-1])  # (rows, tokens, in); the pooler's (rows, in) too
        h = torch.bmm(x3, a_stack[idx].transpose(1, 2))  # (rows, tokens, rank)
        b = b_stack[idx].transpose(1, 2)
        if h.dtype == b.dtype == out.dtype:
            out.view(n, -1, out.shape[-1]).baddbmm_(h, b)
        else:  # under autocast the matmuls ran in bf16: add the update, cast, not in place
            out.view(n, -1, out.shape[-1]).add_(torch.bmm(h, b).to(out.dtype))
        return out

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
        adapter = self.lora
        w, bias = self.weight(), self.base_layer.bias
        self._unmerged = (w.detach().clone(), None if bias is None else bias.detach().clone())
        if isinstance(adapter, LoRALayer) and not adapter.use_dora:
            w.copy_((w.float() + adapter.delta_weight()).to(w.dtype))
        else:
            if isinstance(adapter, IA3Layer):
                v = adapter.vector().float()
                if adapter.feedforward:
                    w.copy_((w.float() * v[None, :]).to(w.dtype))
                else:
                    w.copy_((w.float() * v[:, None]).to(w.dtype))
                    if bias is not None:
                        bias.copy_((bias.float() * v).to(bias.dtype))
            else:
                scale = adapter.dora_scale(w).float()
                w.copy_((scale[:, None] * (w.float() + adapter.delta_weight())).to(w.dtype))
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
        self._stack = None

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, "
            f"active={self.active_adapter!r}, merged={self.merged}"
        )
