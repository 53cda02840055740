"""AdaLoRA's rank budget (Zhang et al., ICLR 2023): which singular triplets keep their place.

After each optimizer step, every AdaLoRA tensor's importance is its sensitivity ``|w · ∂L/∂w|``
smoothed by an EMA (β1), times the EMA (β2) of its uncertainty ``|I − Ī|``. A triplet's score is
its singular value's, plus the mean of its left and of its right singular vector's entries.
The budget (kept triplets over all layers) falls from ``Σ init_r`` to ``target_r`` per layer
on a cubic schedule between ``tinit`` and ``total_step − tfinal``; every ``deltaT`` steps the
lowest-scored triplets beyond it are masked (Λ set to 0), and from ``total_step − tfinal`` on
the final masks hold. The orthogonality regulariser keeps P and Q near orthonormal::

    R = mean over the P and Q matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F,  loss += orth_reg_weight·R

(PEFT's form, so a config means the same in both; the paper sums squared norms). Under
torchrun the gradients are averaged before the hook runs and the weights are the same on every
process, so every process scores, and masks, the same triplets with no extra communication.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.adalora import SCHEDULE_KEYS, AdaLoRALayer
from lorakit.config import LoraSettings
from lorakit.errors import LoraKitError
from lorakit.inject import lora_layers

LEAVES = ("lora_A", "lora_E", "lora_B")


class RankBudget:
    """The training-time half of AdaLoRA: scores, schedule, masks; a ``Hooks`` participant
    (``step`` after each optimizer step, ``orth_loss`` as a loss term) with a state to resume."""

    def __init__(self, model: nn.Module, settings: LoraSettings, total_step: int) -> None:
        self.layers = [
            (name, layer.lora)
            for name, layer in lora_layers(model)
            if isinstance(layer.lora, AdaLoRALayer)
        ]
        if not self.layers:
            raise LoraKitError("variant adalora: the model has no AdaLoRA layers")
        self.tinit, self.tfinal, self.total_step = settings.tinit, settings.tfinal, total_step
        if self.tinit >= total_step - self.tfinal:
            raise LoraKitError(
                f"lora.tinit ({self.tinit}) + lora.tfinal ({self.tfinal}) leave no budgeting "
                f"phase in this run's {total_step} steps"
            )
        self.delta_t, self.beta1, self.beta2 = settings.deltaT, settings.beta1, settings.beta2
        self.orth_reg_weight = settings.orth_reg_weight
        self.init_bgt = sum(a.init_r for _, a in self.layers)
        self.target_bgt = settings.target_r * len(self.layers)
        self.ipt: dict[str, torch.Tensor] = {}  # smoothed sensitivity
        self.unc: dict[str, torch.Tensor] = {}  # smoothed uncertainty
        self.history: list[tuple[int, list[int]]] = []  # (step, rank of each layer)
        schedule = {
            "init_r": settings.rank,
            "target_r": settings.target_r,
            "tinit": settings.tinit,
            "tfinal": settings.tfinal,
            "deltaT": settings.deltaT,
            "beta1": settings.beta1,
            "beta2": settings.beta2,
            "orth_reg_weight": settings.orth_reg_weight,
            "total_step": total_step,
        }
        assert set(schedule) == set(SCHEDULE_KEYS)
        for _, adapter in self.layers:
            adapter.schedule = dict(schedule)

    def budget(self, step: int) -> tuple[int, bool]:
        """The triplets to keep after ``step``, and whether to mask at it."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        left = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * left**3 + self.target_bgt)
        return budget, step % self.delta_t == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.beta1, self.beta2
        for name, adapter in self.layers:
            for leaf in LEAVES:
                p = getattr(adapter, leaf)
                key = f"{name}.{leaf}"
                sensitivity = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                ipt = self.ipt.get(key, torch.zeros_like(p))
                unc = self.unc.get(key, torch.zeros_like(p))
                ipt = b1 * ipt + (1 - b1) * sensitivity
                self.ipt[key] = ipt
                self.unc[key] = b2 * unc + (1 - b2) * (sensitivity - ipt).abs()

    def scores(self) -> list[torch.Tensor]:
        """Each layer's triplet scores, (init_r,) each."""
        out = []
        for name, _ in self.layers:
            s = {leaf: self.ipt[f"{name}.{leaf}"] * self.unc[f"{name}.{leaf}"] for leaf in LEAVES}
            out.append(s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0))
        return out

    @torch.no_grad()
    def mask_to(self, budget: int) -> None:
        """Mask every triplet scored at or below the (init − budget)-th lowest score."""
        scores = self.scores()
        k = self.init_bgt - budget
        if k > 0:
            threshold = torch.kthvalue(torch.cat(scores), k).values.item()
            for (_, adapter), score in zip(self.layers, scores, strict=True):
                adapter.mask = (score > threshold).tolist()
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for _, adapter in self.layers:
            keep = torch.tensor(adapter.mask, device=adapter.lora_E.device)
            adapter.lora_E.masked_fill_(~keep[:, None], 0.0)

    def step(self, model: nn.Module, step: int) -> None:
        """After the optimizer step, before the gradients are cleared (PEFT's
        ``update_and_allocate``)."""
        final = self.total_step - self.tfinal
        if step < final:
            self.update_importance()
            budget, mask = self.budget(step)
            if mask:
                self.mask_to(budget)
        elif step == final:
            self.mask_to(self.target_bgt)  # the final allocation; its scores are then dropped
            self.ipt.clear()
            self.unc.clear()
        else:
            self.apply_masks()
        ranks = self.ranks()
        if not self.history or self.history[-1][1] != ranks:
            self.history.append((step, ranks))

    def ranks(self) -> list[int]:
        return [sum(a.mask) for _, a in self.layers]

    def orth_loss(self, model: nn.Module, outputs: Any) -> torch.Tensor:
        """``orth_reg_weight`` × the mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over the layers."""
        terms = []
        for _, adapter in self.layers:
            for cov in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return self.orth_reg_weight * torch.stack(terms).mean().float()

    def state_dict(self) -> dict[str, Any]:
        return {
            "ipt": dict(self.ipt),
            "unc": dict(self.unc),
            "masks": {name: list(a.mask) for name, a in self.layers},
            "history": [[step, ranks] for step, ranks in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ipt, self.unc = dict(state["ipt"]), dict(state["unc"])
        for name, adapter in self.layers:
            adapter.mask = list(state["masks"][name])
        self.history = [(int(step), list(ranks)) for step, ranks in state["history"]]

    def final_ranks(self) -> dict[str, int]:
        return {name: sum(a.mask) for name, a in self.layers}
