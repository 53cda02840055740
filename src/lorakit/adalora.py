"""AdaLoRA's update (Zhang et al., ICLR 2023): LoRA shaped like an SVD, whose rank can shrink.

    AdaLoRA y = x Wᵀ + b + s · dropout(x) (Q ⊙ Λ)ᵀ Pᵀ        s = alpha / r₀

    P: (out, r) left singular vectors   PEFT's lora_B
    Λ: (r, 1) singular values           PEFT's lora_E
    Q: (r, in) right singular vectors   PEFT's lora_A

r₀ is the initial rank (``init_r``; PEFT's ``ranknum``), kept as the divisor when training
masks triplets (sets their Λ to zero) and saving drops them, so a layer's rank can differ
from r₀ and from every other layer's (``rank_pattern``: one boolean per initial triplet).
Λ starts at zero, so a fresh layer computes what the base layer did. With ``Q' = Q ⊙ Λ`` the
update is plain LoRA of rank r and scaling s: that is how it runs (the fused LoRA node) and
how ``lorakit merge --plain_lora`` rewrites it for runtimes that know only LoRA.

One adapter kind behind the adapter protocol (see ``lorakit.lora``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.fused import lora_linear
from lorakit.lora import Host, LayerSpec

# PEFT's AdaLoraConfig keys that describe training (the budget schedule), kept as read.
SCHEDULE_KEYS = (
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
)
EPS = 1e-5  # PEFT's: the update divides by (ranknum + 1e-5)


class AdaLoRALayer(nn.Module):
    """``s · B((A ⊙ E)(dropout(x)))`` with ``s = alpha / (init_r + 1e-5)``, as PEFT computes it."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        init_r: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if rank < 0 or init_r <= 0 or rank > init_r:
            raise ValueError(f"AdaLoRA needs 0 <= rank <= init_r, init_r > 0: {rank}, {init_r}")
        self.rank, self.init_r, self.alpha = rank, init_r, alpha
        # PEFT's scaling: lora_alpha, or the rank when alpha is 0; divided by ranknum = init_r.
        self.scaling = (alpha if alpha > 0 else float(init_r)) / (init_r + EPS)
        self.lora_A = nn.Parameter(torch.randn(rank, in_features) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, rank) * 0.02)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.schedule: dict[str, Any] = {"init_r": init_r}  # the config's training keys
        self.mask: list[bool] = [True] * rank + [False] * (init_r - rank)  # kept triplets
        # While training, the tensors keep all init_r triplets (masked ones have Λ = 0) and an
        # adapter file drops the masked ones; a checkpoint keeps them all (``untrimmed``).
        self.untrimmed = False

    def scaled_A(self) -> torch.Tensor:
        """``A ⊙ E`` (rank, in): the right singular vectors times their singular values."""
        return self.lora_A * self.lora_E

    def delta_weight(self) -> torch.Tensor:
        """``s · B (A ⊙ E)`` in fp32, shape (out, in)."""
        return (self.lora_B.float() @ self.scaled_A().float()) * self.scaling

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B (A ⊙ E) dropout(x)`` in ``x``'s dtype (on a bf16 base, as ``LoRALayer.down``)."""
        a, b = self.scaled_A().to(x.dtype), (self.lora_B * self.scaling).to(x.dtype)
        return F.linear(F.linear(self.dropout(x), a), b)

    # -- the adapter protocol ----------------------------------------------------------------

    kind = "ADALORA"
    stackable = False  # mixed batches run it per adapter's rows
    full_target_names = False

    @staticmethod
    def layer_rank(name: str, config: dict[str, Any]) -> int:
        """The rank the file holds for ``name``: its kept triplets, else ``init_r``."""
        mask = (config.get("rank_pattern") or {}).get(f"{name}.lora_E")
        return sum(bool(m) for m in mask) if mask is not None else int(config["init_r"])

    @classmethod
    def add_to(
        cls, layer: Host, name: str, init_r: int, alpha: float, dropout: float = 0.0
    ) -> AdaLoRALayer:
        """A new adapter of this kind (Λ = 0: no update yet) under ``name``, made active."""
        new = cls(layer.in_features, layer.out_features, init_r, alpha, init_r, dropout)
        layer.register(name, new)
        return new

    def _trims(self) -> bool:
        """Whether a file drops masked triplets: training-sized tensors, some masked."""
        return not self.untrimmed and self.rank == self.init_r and not all(self.mask)

    @classmethod
    def attach(
        cls, layer: Host, name: str, spec: LayerSpec, config: dict[str, Any]
    ) -> AdaLoRALayer:
        init_r = int(config["init_r"])
        old = layer.adapters[name] if name in layer.adapters else None  # noqa: SIM401 - a ModuleDict
        if isinstance(old, cls) and (old.rank, old.init_r, old.alpha) == (
            spec.rank,
            init_r,
            spec.alpha,
        ):
            new = old
        else:
            dropout = float(config.get("lora_dropout", 0.0))
            new = cls(layer.in_features, layer.out_features, spec.rank, spec.alpha, init_r, dropout)
            layer.register(name, new)
        new.schedule = {k: config[k] for k in SCHEDULE_KEYS if config.get(k) is not None}
        layer_name = getattr(spec, "name", None)
        mask = (config.get("rank_pattern") or {}).get(f"{layer_name}.lora_E")
        if mask is not None:
            new.mask = [bool(m) for m in mask]
        return new

    @staticmethod
    def tensor_shapes(
        spec: LayerSpec, n_in: int, n_out: int, config: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """PEFT's AdaLoRA tensors for one layer (plain parameters: no ``.weight`` suffix)."""
        r = spec.rank
        return {"lora_A": (r, n_in), "lora_E": (r, 1), "lora_B": (n_out, r)}

    @staticmethod
    def peft_config(layers: list[tuple[str, Any]], bias: str) -> dict[str, Any]:
        """PEFT's AdaLoRA config: the schedule as read (or trained), one mask per layer."""
        ada = [(n, a) for n, a in layers if isinstance(a, AdaLoRALayer)]
        first = ada[0][1]
        if len({(a.init_r, a.alpha) for _, a in ada}) > 1:
            raise ValueError("the model's AdaLoRA layers differ in init_r or alpha")
        dropout = first.dropout
        schedule = dict(first.schedule)
        # PEFT's AdaLoraConfig refuses a config without a positive total_step, and one whose
        # schedule leaves no budgeting phase; a finished adapter no longer uses either.
        schedule.setdefault("total_step", 1)
        schedule.setdefault("target_r", first.init_r)
        if schedule.get("tinit", 0) >= schedule["total_step"] - schedule.get("tfinal", 0):
            schedule.update(tinit=0, tfinal=0, total_step=max(1, int(schedule["total_step"])))
        return {
            "peft_type": "ADALORA",
            **schedule,
            "lora_alpha": first.alpha,
            "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            "bias": bias,
            "init_lora_weights": True,
            "rank_pattern": {
                f"{n}.lora_E": a.mask if a._trims() or a.rank < a.init_r else [True] * a.init_r
                for n, a in ada
            },
        }

    def output(self, layer: Host, x: torch.Tensor) -> torch.Tensor:
        base = layer.base_layer
        quantized = getattr(base, "quantized", False)
        w = None if quantized else layer.weight()
        dtype = base.compute_dtype if quantized else w.dtype  # type: ignore[union-attr]
        plain = not torch.is_autocast_enabled(x.device.type)
        if plain and self.rank and x.dtype == self.lora_A.dtype == dtype:
            xd = self.dropout(x)
            return lora_linear(
                x,
                None if xd is x else xd,
                w,
                base.bias,
                self.scaled_A(),
                self.lora_B,
                self.scaling,
                base.dequantize if quantized else None,
            )
        out = base(x)
        return out + self._update(x).to(out.dtype)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def add_to_rows(self, layer: Host, x: torch.Tensor, part: torch.Tensor) -> None:
        part += self._update(x).to(part.dtype)

    def merged(
        self, w: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (w.float() + self.delta_weight()).to(w.dtype), bias

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's tensors for a file: the kept triplets only (PEFT's ``rank_pattern`` trim)."""
        a, e, b = self.lora_A, self.lora_E, self.lora_B
        if self._trims():
            keep = torch.tensor(self.mask, device=a.device)
            return {"lora_A": a[keep], "lora_E": e[keep], "lora_B": b[:, keep]}
        return {"lora_A": a, "lora_E": e, "lora_B": b}


@contextmanager
def untrimmed(model: nn.Module) -> Iterator[None]:
    """Adapter files written meanwhile keep every triplet (a checkpoint: exact resume)."""
    layers = [m for m in model.modules() if isinstance(m, AdaLoRALayer)]
    for layer in layers:
        layer.untrimmed = True
    try:
        yield
    finally:
        for layer in layers:
            layer.untrimmed = False


def as_plain_lora(
    config: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A finished AdaLoRA adapter (its config and tensors, PEFT's keys) as the plain LoRA
    adapter with the same update: per layer ``A' = A ⊙ E``, ``B' = B``, rank = kept triplets
    (``rank_pattern``) and ``alpha' = s · rank`` (``alpha_pattern``). Layers with no triplet
    left are dropped; ``target_modules`` names the others in full."""
    init_r = int(config["init_r"])
    alpha = float(config["lora_alpha"])
    s = (alpha if alpha > 0 else float(init_r)) / (init_r + EPS)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("lora_E", "lora_B"):
            continue
        if leaf != "lora_A":
            tensors[key] = value  # the head, biases
            continue
        if value.shape[0] == 0:
            continue
        tensors[f"{module}.lora_A.weight"] = value * state[f"{module}.lora_E"]
        tensors[f"{module}.lora_B.weight"] = state[f"{module}.lora_B"]
        ranks[module.removeprefix("base_model.model.")] = int(value.shape[0])
    if not ranks:
        raise ValueError("every layer of this AdaLoRA adapter has rank 0: nothing to convert")
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    keep = ("task_type", "modules_to_save", "base_model_name_or_path", "bias", "lora_dropout")
    plain = {k: config[k] for k in keep if k in config}
    plain.update(
        peft_type="LORA",
        r=common,
        lora_alpha=s * common,
        target_modules=sorted(ranks),
        rank_pattern={n: r for n, r in ranks.items() if r != common},
        alpha_pattern={n: s * r for n, r in ranks.items() if r != common},
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        init_lora_weights=True,
        inference_mode=True,
    )
    return plain, tensors
