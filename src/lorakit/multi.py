"""Many adapters over one base model, and batches that mix them.

One copy of the frozen base model stays in memory, unmerged. Each adapter adds its own LoRA
tensors to the layers it targets (of any rank), its own task head and its own labels. A mixed
batch runs every frozen matmul once for all rows; then, layer by layer, each adapter adds its
low-rank update to its own rows (rows grouped by adapter, as Punica/S-LoRA's segmented
kernels do) and its head scores them. ``AdapterSet`` is not thread-safe by itself: the
server's worker calls ``logits`` and loads/unloads under ``AdapterSet.lock``.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.adapter import (
    LAYER_TENSOR,
    attach,
    lora_plan,
    read_adapter_config,
    read_adapter_weights,
)
from lorakit.data import DEFAULT_MAX_LENGTH, adapter_text_columns
from lorakit.errors import LoraKitError
from lorakit.inject import find_heads, lora_layers, set_submodule
from lorakit.inject import quantize_base as quantize_layers
from lorakit.mixed import Router, Routes
from lorakit.models import load_model, load_tokenizer
from lorakit.runtime import amp_dtype, autocast


@dataclass(frozen=True)
class ServedAdapter:
    """What the server knows about one loaded adapter."""

    name: str
    path: str
    labels: tuple[str, ...]  # in class-id order
    text_columns: tuple[str, ...]
    max_length: int
    task: str | None
    ranks: tuple[int, ...]  # the distinct LoRA ranks of its layers (none for IA³)
    variant: str  # LoRA, rsLoRA, DoRA, IA³ or AdaLoRA

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "labels": list(self.labels),
            "text_columns": list(self.text_columns),
            "task": self.task,
            "max_length": self.max_length,
            "ranks": list(self.ranks),
            "variant": self.variant,
        }


class HeadSwitch(nn.Module):
    """Stands where the task head was; sends each adapter's rows through that adapter's head.

    Heads may have different numbers of labels: the output is padded with zeros to the
    widest, and ``AdapterSet.logits`` cuts each row back to its adapter's labels.
    """

    def __init__(self, router: Router, template: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.template = [template]  # a list: not a submodule, its weights are never used
        self.heads = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routes = self.router.routes
        if routes is None:
            raise RuntimeError("HeadSwitch runs only inside AdapterSet.logits")
        parts = [(rows, self.heads[name](x[rows])) for name, rows in routes]
        width = max(p.shape[-1] for _, p in parts)
        first = parts[0][1]
        out = first.new_zeros((x.shape[0], *first.shape[1:-1], width))
        for rows, p in parts:
            out[rows, ..., : p.shape[-1]] = p
        return out


class AdapterSet:
    """A base model shared by named adapters; ``logits`` scores rows of mixed adapters."""

    def __init__(
        self,
        model_name: str,
        device: torch.device | None = None,
        precision: str = "fp32",
        quantize_base: str = "none",
    ) -> None:
        self.model_name = model_name
        self.device = device or torch.device("cpu")
        self.amp = amp_dtype(precision, self.device, "serve")  # None: fp32
        self.tokenizer = load_tokenizer(model_name)
        model = load_model(model_name, {0: "0", 1: "1"})
        self.quantize_base = quantize_base  # one quantized base, shared by every adapter
        if quantize_base != "none":
            quantize_layers(model, quantize_base)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.base_labels = int(self.model.config.num_labels)
        self.router = Router()
        self.lock = threading.Lock()
        self.adapters: dict[str, ServedAdapter] = {}
        self.switches: dict[str, HeadSwitch] = {}
        for head in find_heads(self.model):
            switch = HeadSwitch(self.router, self.model.get_submodule(head))
            set_submodule(self.model, head, switch)
            self.switches[head] = switch
        for p in self.model.parameters():
            p.requires_grad_(False)

    # -- loading -------------------------------------------------------------------------

    def load(self, name: str, directory: str | Path) -> ServedAdapter:
        """Check the adapter against the base model, then add it; a misfit changes nothing.

        Raises:
            LoraKitError: name taken, unreadable adapter, or one that does not fit the base
                (other shapes, a missing head, tensors that would change the shared base).
        """
        if name in self.adapters:
            raise LoraKitError(f"an adapter named {name!r} is already loaded")
        config = read_adapter_config(directory)
        state = read_adapter_weights(directory)
        if config.get("bias", "none") != "none":
            raise LoraKitError(
                f"adapter {name!r} trains biases (bias={config['bias']!r}), which would change "
                "the base model every adapter shares; merge it and serve it on its own"
            )
        with self.lock:
            plan = lora_plan(self.model, config, state)
            heads = self._check_heads(name, config, state)
            served = ServedAdapter(  # every fact checked before anything is attached
                name=name,
                path=str(directory),
                labels=_labels(config, heads),
                text_columns=adapter_text_columns(config),
                max_length=int(config.get("max_length") or DEFAULT_MAX_LENGTH),
                task=config.get("task"),
                ranks=tuple(sorted({p.rank for p in plan if p.kind in ("LORA", "ADALORA")})),
                variant=_variant(config),
            )
            for wrapper in attach(self.model, plan, config, state, name):
                wrapper.router = self.router
                wrapper.requires_grad_(False)
                wrapper.eval()  # new modules train by default: no LoRA dropout when serving
            for head, module in heads.items():
                self.switches[head].heads[name] = module
            self.router.generation += 1  # the layers' stacked adapters are stale
        self.adapters[name] = served
        return served

    def _check_heads(
        self, name: str, config: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> dict[str, nn.Module]:
        """The adapter's own copy of every head module, filled from its tensors."""
        heads: dict[str, nn.Module] = {}
        for head, switch in self.switches.items():
            module = copy.deepcopy(switch.template[0])
            for pname, param in list(module.named_parameters()):
                key = f"{head}.{pname}"
                if key not in state:
                    raise LoraKitError(f"incomplete adapter {name!r}: it has no tensor for {key!r}")
                value = state[key]
                label_dim = (
                    param.shape[0] == self.base_labels and value.shape[1:] == param.shape[1:]
                )
                if value.shape != param.shape and not label_dim:
                    raise LoraKitError(
                        f"adapter {name!r}: {key!r} has shape {tuple(value.shape)}, the base "
                        f"model's head expects {tuple(param.shape)}"
                    )
                owner, _, leaf = pname.rpartition(".")
                target = module.get_submodule(owner) if owner else module
                setattr(target, leaf, nn.Parameter(value.to(self.device), requires_grad=False))
            heads[head] = module.eval()
        known = {f"{h}.{p}" for h, m in heads.items() for p, _ in m.named_parameters()}
        for key in state:
            if not LAYER_TENSOR.match(key) and key not in known:
                raise LoraKitError(
                    f"adapter {name!r} holds {key!r}, which would change the base model every "
                    "adapter shares (modules_to_save); merge it and serve it on its own"
                )
        return heads

    def unload(self, name: str) -> None:
        """Remove an adapter's tensors and head (the caller has let its requests finish)."""
        if name not in self.adapters:
            raise LoraKitError(f"no adapter named {name!r} is loaded")
        with self.lock:
            for _, layer in lora_layers(self.model):
                if name in layer.adapters:
                    layer.remove_adapter(name)
            for switch in self.switches.values():
                del switch.heads[name]
            del self.adapters[name]
            self.router.generation += 1

    # -- scoring -------------------------------------------------------------------------

    def logits(
        self, batch: Mapping[str, torch.Tensor | np.ndarray], names: list[str]
    ) -> list[np.ndarray]:
        """Each row's logits (its adapter's labels only) for a padded batch of mixed adapters.

        Args:
            batch: int64 (rows, seq) ``input_ids``, ``attention_mask`` (, ``token_type_ids``),
                torch tensors (the server's) or numpy arrays.
            names: the adapter of each row, in any order.
        """
        order = np.argsort(np.asarray(names), kind="stable")  # group rows by adapter
        sorted_names = [names[i] for i in order]
        routes: Routes = []
        start = 0
        for i in range(1, len(order) + 1):
            if i == len(order) or sorted_names[i] != sorted_names[start]:
                routes.append((sorted_names[start], slice(start, i)))
                start = i
        rows = torch.from_numpy(order)
        inputs = {k: torch.as_tensor(v)[rows].to(self.device) for k, v in batch.items()}
        with self.lock, torch.inference_mode(), autocast(self.device, self.amp):
            self.router.routes = routes
            try:
                out = self.model(**inputs).logits.float().cpu().numpy()
            finally:
                self.router.routes = None
        result: list[np.ndarray] = [np.empty(0)] * len(names)
        for row, i in enumerate(order):
            result[i] = out[row, : len(self.adapters[names[i]].labels)]
        return result


def _labels(config: dict[str, Any], heads: dict[str, nn.Module]) -> tuple[str, ...]:
    """Label names in id order: the adapter's own map, else ``0..n-1`` from its head's width."""
    id2label = config.get("id2label") or {}
    if id2label:
        return tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    n = int(config.get("num_labels") or 0)
    if not n:  # the last parameter of a head is its output layer's bias or weight
        n = int(list(list(heads.values())[-1].parameters())[-1].shape[0])
    return tuple(str(i) for i in range(n))


def _variant(config: dict[str, Any]) -> str:
    if config.get("peft_type") in ("IA3", "ADALORA"):
        return {"IA3": "IA³", "ADALORA": "AdaLoRA"}[config["peft_type"]]
    return "DoRA" if config.get("use_dora") else "rsLoRA" if config.get("use_rslora") else "LoRA"
