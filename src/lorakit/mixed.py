"""Mixed-adapter batches: each row of one batch through its own adapter, the base matmul once.

Serving (``lorakit.multi``) sorts a batch's rows by adapter and sets ``Router.routes``
(adapter name -> its contiguous row slice); every ``LinearWithLoRA`` that has the router then
hands its forward to ``Router.forward``, which runs one of two plans (Punica / S-LoRA):

- grouped: the base matmul for all rows, then each adapter adds its update to its rows' view
  of the output (``add_to_rows`` of the adapter protocol), so any adapter kind takes part;
- gathered: when every adapter of the layer is plain LoRA (``stackable``) and no gradient is
  wanted, their A and s·B are stacked once (``stacked``) and each row's pair is gathered, so
  the whole update is two batched matmuls whatever the number of adapters.
"""

from __future__ import annotations

import weakref

import torch

from lorakit.lora import LoRALayer
from lorakit.wrapper import LinearWithLoRA

Routes = list[tuple[str, slice]]  # adapter name -> the batch rows it owns, grouped
# A layer's plain-LoRA adapters: name -> position, A as (K+1, r, in) and s·B as (K+1, out, r),
# ranks zero-padded to the largest, the last entry zero (for rows of adapters that do not
# adapt this layer).
Stack = tuple[dict[str, int], torch.Tensor, torch.Tensor]


class Router:
    """Shared by every layer of one model: which rows of the current batch use which adapter.

    ``routes`` is None outside a mixed batch; then each layer runs its active adapter.
    """

    def __init__(self) -> None:
        self.routes: Routes | None = None
        # Bumped whenever an adapter is loaded or removed: layers' stacks are rebuilt.
        self.generation = 0
        # layer -> ((generation, adapter names), its stack or None when one is not plain LoRA)
        self.stacks: weakref.WeakKeyDictionary[
            LinearWithLoRA, tuple[tuple[int, tuple[str, ...]], Stack | None]
        ] = weakref.WeakKeyDictionary()

    def forward(self, layer: LinearWithLoRA, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output for a mixed batch of ``routes``."""
        routes = self.routes
        assert routes is not None
        if layer.merged:
            raise RuntimeError("mixed-adapter batches need unmerged weights")
        if len(routes) > 1 and not torch.is_grad_enabled() and not layer.training:
            stack = stacked(layer, self)
            if stack is not None and stack[1].dtype == x.dtype:
                return gathered(layer, x, routes, stack)
        return grouped(layer, x, routes)


def grouped(layer: LinearWithLoRA, x: torch.Tensor, routes: Routes) -> torch.Tensor:
    """The base matmul once for all rows; each adapter then updates its rows' (contiguous)
    view of the output: no gather, no scatter. An adapter that scales the input (feed-forward
    IA³) does so on its rows before the shared matmul."""
    present = [(layer.adapter(name), rows) for name, rows in routes if name in layer.adapters]
    scaled_input = x
    for adapter, rows in present:
        scaled = adapter.scale_input(x[rows])
        if scaled is not None:
            if scaled_input is x:
                scaled_input = x.clone()
            scaled_input[rows] = scaled
    out = layer.base_layer(scaled_input)
    for adapter, rows in present:
        adapter.add_to_rows(layer, x[rows], out[rows])
    return out


def stacked(layer: LinearWithLoRA, router: Router) -> Stack | None:
    """``layer``'s adapters stacked (``Stack``), or None if one is not plain LoRA; rebuilt
    when the router's generation or the layer's adapter names change."""
    key = (router.generation, tuple(layer.adapters))
    cached = router.stacks.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    adapters = [(n, layer.adapter(n)) for n in layer.adapters]
    stack: Stack | None = None
    if adapters and all(a.stackable for _, a in adapters):
        loras = [a for _, a in adapters if isinstance(a, LoRALayer)]
        rank = max(a.rank for a in loras)
        first = loras[0].lora_A
        a_stack = first.new_zeros((len(loras) + 1, rank, layer.in_features))
        b_stack = first.new_zeros((len(loras) + 1, layer.out_features, rank))
        with torch.no_grad():
            for i, a in enumerate(loras):
                a_stack[i, : a.rank] = a.lora_A
                b_stack[i, :, : a.rank] = a.scaled_B()
        stack = ({n: i for i, (n, _) in enumerate(adapters)}, a_stack, b_stack)
    router.stacks[layer] = (key, stack)
    return stack


def gathered(layer: LinearWithLoRA, x: torch.Tensor, routes: Routes, stack: Stack) -> torch.Tensor:
    """A mixed batch in four kernels whatever the number of adapters (Punica's gathered
    LoRA): each row's A and s·B are gathered from the stack, then one batched matmul down and
    one batched matmul-add up. The same FLOPs as one adapter's update."""
    positions, a_stack, b_stack = stack
    n = x.shape[0]
    index = [a_stack.shape[0] - 1] * n
    for name, rows in routes:
        index[rows] = [positions.get(name, a_stack.shape[0] - 1)] * (rows.stop - rows.start)
    idx = torch.tensor(index, device=x.device)
    out = layer.base_layer(x)
    x3 = x.reshape(n, -1, x.shape[-1])  # (rows, tokens, in); the pooler's (rows, in) too
    h = torch.bmm(x3, a_stack[idx].transpose(1, 2))  # (rows, tokens, rank)
    b = b_stack[idx].transpose(1, 2)
    if h.dtype == b.dtype == out.dtype:
        out.view(n, -1, out.shape[-1]).baddbmm_(h, b)
    else:  # under autocast the matmuls ran in bf16: add the update, cast, not in place
        out.view(n, -1, out.shape[-1]).add_(torch.bmm(h, b).to(out.dtype))
    return out
