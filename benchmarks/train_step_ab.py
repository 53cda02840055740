"""What the fused LoRA linear and the dropout masks cost in a training step: paired A/B.

    .venv/bin/python benchmarks/train_step_ab.py --data_dir ../shared/data --batches 30

The shipped SST-2 recipe (configs/sst2_minilm.yaml: MiniLM, LoRA on query/key/value/dense, batch
32, length-grouped; r=8 until 2026-11-30, r=32 since, so the logged figures are at r=8).
Every batch is run once under each variant, in a rotating order, so each variant's step is
timed right beside the others' on the same rows: the paired ratio (old step time / variant
step time, median over batches) is robust to the drifts of a shared machine.

Variants: "old" = LoRA through autograd's plain formula (two matmuls, a scale and an add) and
torch's dropout; "fused" = ``lorakit.fused.lora_linear``; "+ fast dropout" = ``FastDropout``
masks for the hidden-state dropouts (the attention-prob dropout stays in SDPA), lorakit's
default; "+ no attention dropout" and "+ no dropout at all" show what the remaining dropout
costs (they change the recipe, so they are references, not options).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from train_throughput import ROOT, cpu_name, publish

from lorakit import lora
from lorakit.config import load_config
from lorakit.data import batch_order, collate
from lorakit.dropout import FastDropout
from lorakit.models import load_tokenizer
from lorakit.train import build_model, build_optimizer, load_data

Variant = tuple[bool, str]  # (fused, dropout: torch | fast | fast-noattn | none)
VARIANTS: dict[str, Variant] = {
    "old: plain LoRA, torch dropout": (False, "torch"),
    "fused LoRA, torch dropout": (True, "torch"),
    "fused LoRA + fast dropout (lorakit default)": (True, "fast"),
    "+ no attention-prob dropout (reference)": (True, "fast-noattn"),
    "+ no dropout at all (reference)": (True, "none"),
}


def _dropout_setter(model: nn.Module) -> Callable[[str], None]:
    """Sets every dropout of ``model`` to one kind; attention's dropout only passes its p."""
    slots = [
        (parent, name, child.p, hasattr(parent, "is_causal"))
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Dropout)
    ]

    def set_kind(kind: str) -> None:
        for parent, name, p, in_attention in slots:
            if kind == "none" or (kind == "fast-noattn" and in_attention):
                p = 0.0
            module = nn.Dropout(p) if kind == "torch" else FastDropout(p)
            setattr(parent, name, module.train())

    return set_kind


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--no_docs", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    config = load_config(ROOT / "configs" / "sst2_minilm.yaml", {"data.data_dir": args.data_dir})
    t = config.training
    train_ex, train_data, _, _ = load_data(config, load_tokenizer(config.model_name))
    model = build_model(config, train_ex.label_names, torch.device("cpu"))
    opt, sched, _ = build_optimizer(config, model, len(train_ex.texts))
    params = [q for g in opt.param_groups for q in g["params"]]
    set_dropout = _dropout_setter(model)
    fusable = lora._fusable

    def step(idx: np.ndarray) -> None:
        model(**collate(train_data, idx)).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def use(variant: Variant) -> None:
        fused, dropout = variant
        lora._fusable = fusable if fused else (lambda a, w, x: False)
        set_dropout(dropout)

    order = batch_order(train_data.lengths, t.batch_size, t.seed, 0, t.group_by_length)
    model.train()
    for idx in order[:3]:
        step(idx)
    names = list(VARIANTS)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for i, idx in enumerate(order[3 : 3 + args.batches]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            use(VARIANTS[name])
            tick = time.perf_counter()
            step(idx)
            seconds[name].append(time.perf_counter() - tick)
    lora.LinearWithLoRA._fusable = fusable  # type: ignore[method-assign]
    old = np.asarray(seconds[names[0]])
    record = {
        "date": str(datetime.date.today()),
        "machine": cpu_name(),
        "threads": torch.get_num_threads(),
        "batch_size": t.batch_size,
        "seconds": seconds,
    }
    (ROOT / "benchmarks" / "results" / "train_step_ab.json").write_text(json.dumps(record))
    lines = [
        f"### Training step: fused LoRA linear and dropout masks, paired A/B, {record['date']}",
        "",
        f"Command: `.venv/bin/python benchmarks/train_step_ab.py --data_dir {args.data_dir} "
        f"--batches {args.batches}`  ",
        f"Machine: {record['machine']}, torch {torch.__version__} ({record['threads']} "
        f"threads), fp32. The shipped recipe; each of {args.batches} batches (32 rows) run "
        "under every variant in rotating order.",
        "",
        "| variant | median step ms | examples/s (sum over batches) | speed-up vs old "
        "(median of paired ratios) |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        s = np.asarray(seconds[name])
        lines.append(
            f"| {name} | {1e3 * np.median(s):.1f} | {t.batch_size * len(s) / s.sum():.1f} | "
            f"{np.median(old / s):.3f}x |"
        )
    publish("\n".join(lines) + "\n", args.no_docs)


if __name__ == "__main__":
    main()
