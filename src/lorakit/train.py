"""A training run's setup: data, model, AdamW with warmup + linear decay, and the ``Run`` for
``loop.Loop``, which trains (clipping, accumulation, autocast, evaluation, checkpoints).

``train(config)`` writes DESIGN.md's output directory: best/, final/, checkpoint/, config.yaml,
metrics.jsonl, training_log.txt, training_curves.png and summary.json.
"""

from __future__ import annotations

import copy
import json
import math
import random
import resource
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from lorakit.atomic import write_text
from lorakit.checkpoint import (
    LoopState,
    Optimization,
    check_resume,
    load_checkpoint,
    restore_rng,
    saved_world_size,
)
from lorakit.classes import class_weights
from lorakit.config import Config, save_config
from lorakit.data import Encoded, Examples, encode, hold_out, load_examples
from lorakit.distributed import World, start
from lorakit.dropout import use_fast_dropout
from lorakit.errors import LoraKitError
from lorakit.inject import (
    apply_adalora_to_model,
    apply_ia3_to_model,
    apply_lora_to_model,
    quantize_base,
)
from lorakit.loop import Hooks, Interrupted, Loop, Run, task_name
from lorakit.models import load_model, load_tokenizer
from lorakit.paths import check_writable
from lorakit.plots import plot_ranks, plot_training_curves
from lorakit.runlog import RunLog, SilentLog
from lorakit.runtime import amp_dtype, pick_device, precision_name, thread_governor
from lorakit.state import (
    count_lora_parameters,
    format_parameter_stats,
    mark_only_lora_as_trainable,
    store_frozen_as,
)
from lorakit.tracking import MLFLOW_RUN_FILE, Trackers, check_reporters

OUTPUTS = (
    "best",
    "final",
    "checkpoint",
    "config.yaml",
    "metrics.jsonl",
    "training_log.txt",
    "training_curves.png",
    "summary.json",
)
ADALORA_PLOT = "adalora_ranks.png"  # variant adalora only: each layer's rank over training
# Written only on request: --report_to's tensorboard events and MLflow run id, eval's reports.
OPTIONAL_OUTPUTS = (ADALORA_PLOT, "tensorboard", MLFLOW_RUN_FILE, "eval")
# The loop's names live in lorakit.loop; these are importable from here as they always were.
__all__ = [
    "OUTPUTS",
    "Hooks",
    "Interrupted",
    "Loop",
    "Run",
    "build_model",
    "build_optimizer",
    "build_run",
    "check_output_dir",
    "load_data",
    "param_groups",
    "train",
]


def check_output_dir(config: Config) -> Path:
    """Refuse a non-empty output_dir unless --overwrite or --resume (nothing is deleted here).

    Also refuses, before any slow work, an output_dir that is a file or cannot be written.
    """
    out = Path(config.training.output_dir)
    t = config.training
    check_writable(out, "dir")
    if t.resume:
        if not (out / "checkpoint").is_dir():
            raise LoraKitError(f"--resume: {out}/checkpoint does not exist")
    elif out.exists() and any(out.iterdir()) and not t.overwrite:
        raise LoraKitError(f"output_dir {out} is not empty; pass --overwrite or --resume")
    return out


def clear_outputs(out: Path) -> None:
    """Remove a previous run's files (only lorakit's own) before a fresh run writes its own."""
    for name in (*OUTPUTS, *OPTIONAL_OUTPUTS):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(config: Config, tokenizer: Any) -> tuple[Examples, Encoded, Encoded, Encoded | None]:
    """Training examples (for label names and metric), and the training, validation and dev
    (``dev_split``, else None) rows tokenized once.

    The dev rows are held out of the whole training file before ``max_train_samples`` takes
    its first rows, so the dev set does not change with the training budget.
    """
    t = config.training
    train_ex, dev_ex = load_examples(config.data, "train"), None
    if t.dev_split:
        train_ex, dev_ex = hold_out(train_ex, t.dev_split)
    train_ex = train_ex.head(t.max_train_samples)
    eval_ex = load_examples(config.data, "validation", train_ex.label_names)
    eval_ex = eval_ex.head(t.max_eval_samples)
    if config.num_labels and config.num_labels != len(train_ex.label_names):
        raise LoraKitError(
            f"num_labels is {config.num_labels} but the data has "
            f"{len(train_ex.label_names)} labels: {', '.join(train_ex.label_names)}"
        )
    return (
        train_ex,
        encode(train_ex, tokenizer, t.max_length),
        encode(eval_ex, tokenizer, t.max_length),
        None if dev_ex is None else encode(dev_ex, tokenizer, t.max_length),
    )


def build_model(config: Config, label_names: tuple[str, ...], device: torch.device) -> Any:
    """The base classifier with LoRA injected and only LoRA + head trainable; or, for the
    baselines, with only the head (``method: head``) or every weight (``full``) trainable."""
    lora = config.lora
    model = load_model(config.model_name, dict(enumerate(label_names)))
    if config.method == "full":
        model.requires_grad_(True)
    elif config.method == "head":
        mark_only_lora_as_trainable(model)  # no LoRA layers: the head alone
    elif lora.variant == "ia3":
        apply_ia3_to_model(model, lora.target_modules, lora.feedforward_modules)
    elif lora.variant == "adalora":
        apply_adalora_to_model(model, lora.target_modules, lora.rank, lora.alpha, lora.dropout)
    else:
        apply_lora_to_model(
            model,
            lora.target_modules,
            lora.rank,
            lora.alpha,
            lora.dropout,
            use_rslora=lora.use_rslora,
            use_dora=lora.variant == "dora",
        )
    if config.method == "lora":
        mark_only_lora_as_trainable(model)
    if config.quantize_base != "none":
        quantize_base(model, config.quantize_base)
    if config.base_dtype == "bf16":
        store_frozen_as(model, torch.bfloat16)
    if config.training.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if device.type == "cpu":  # torch's CPU dropout masks cost ~10% of a step (lorakit.dropout)
        use_fast_dropout(model)
    return model.to(device)  # type: ignore[arg-type]


def param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float = 0.0
) -> list[dict[str, Any]]:
    """AdamW's parameter groups: matrices with weight decay, the rest without; with LoRA+, the
    three of PEFT's ``create_loraplus_optimizer``.

    Weight decay applies to weight matrices only, as the Trainer does it: never to biases
    (the head's, ``bias="all"``'s), LayerNorm weights, DoRA magnitudes or IA³ vectors, which
    decay would pull towards zero instead of towards the base model.
    LoRA+: ``lora_B`` and every 1-d tensor (biases, LayerNorm weights, DoRA magnitudes) learn
    at ``lr * loraplus_lr_ratio``, everything else (``lora_A``, head weights) at ``lr``.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = {id(p) for n, p in trainable if p.ndim > 1 and not n.endswith("ia3_l")}
    if not loraplus_lr_ratio:
        groups = [
            {"params": [p for _, p in trainable if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for _, p in trainable if id(p) not in decayed], "weight_decay": 0.0},
        ]
        return [{**g, "lr": lr} for g in groups if g["params"]]
    fast = [p for n, p in trainable if ".lora_B" in n and id(p) in decayed]
    fast_no_decay = [p for _, p in trainable if id(p) not in decayed]
    slow = [p for n, p in trainable if ".lora_B" not in n and id(p) in decayed]
    groups = [
        {"params": slow, "lr": lr, "weight_decay": weight_decay},
        {"params": fast, "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        {"params": fast_no_decay, "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(config: Config, model: torch.nn.Module, n_train: int) -> tuple[Any, Any, int]:
    """AdamW over the trainable parameters, linear warmup then decay; and the total steps."""
    t = config.training
    groups = param_groups(model, t.learning_rate, t.weight_decay, config.lora.loraplus_lr_ratio)
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
    batches = math.ceil(n_train / t.batch_size)
    total_steps = math.ceil(batches / t.gradient_accumulation_steps) * t.num_epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    warmup = int(t.warmup_ratio * total_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps), total_steps


def train(config: Config, hooks: Hooks | None = None) -> dict[str, Any]:
    """Fine-tune as ``config`` says and return the run summary (also written to summary.json).

    Under torchrun every process runs this (``lorakit.distributed``); rank 0 alone writes.

    Args:
        hooks: code that joins the loop (``loop.Hooks``): extra loss terms, callbacks after
            backward and after each optimizer step, listeners to the metrics.
    """
    world = start(pick_device(config.training.device))
    try:
        return _train(config, world, hooks)
    finally:
        world.close()


def _train(config: Config, world: World, hooks: Hooks | None) -> dict[str, Any]:
    out, t = Path(config.training.output_dir), config.training
    reporters = check_reporters(t.report_to)
    if world.is_main:
        check_output_dir(config)
        if t.resume:
            saved_world = saved_world_size(out / "checkpoint")
            check_resume(_saved_config(out), config.to_dict(), saved_world, world.size)
    world.barrier()  # the others read output_dir once rank 0 has checked (and repaired) it
    run = build_run(config, world, hooks)
    stats = count_lora_parameters(run.opt.model)
    if world.is_main:
        # Only now, with everything loaded, is an old run's output replaced.
        if not t.resume:
            clear_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "training_log.txt", out / "metrics.jsonl") if world.is_main else SilentLog()
    state = _resume(run, log) if t.resume else _begin(run, log, stats)
    trackers = Trackers(
        reporters if world.is_main else [],
        out,
        config.to_dict(),
        state.global_step if t.resume else None,
    )
    run.hooks.on_train_log.append(trackers.log)
    run.hooks.on_eval.append(trackers.log)
    loop = Loop(run, log, state)
    try:
        loop.run()
    except BaseException:
        trackers.stop("KILLED")
        raise
    loop.save_adapter(out / "final", loop.last_eval, loop.last_dev)
    summary = _finish(run, log, state, stats, loop.last_eval)
    trackers.finish(out, summary, state.global_step)
    world.barrier()  # every process returns once rank 0's files are complete
    return summary


def build_run(config: Config, world: World, hooks: Hooks | None = None) -> Run:
    """Everything the loop works on: tokenized data, the model, its optimizer, the device."""
    t, device = config.training, world.device
    dtype = amp_dtype(t.precision, device)
    seed_everything(t.seed)
    tokenizer = load_tokenizer(config.model_name)
    train_ex, train_data, eval_data, dev_data = load_data(config, tokenizer)
    model = build_model(config, train_ex.label_names, device)
    # Each process runs 1/world.size of every global batch: the steps are the global batch's.
    rows_per_process = math.ceil(len(train_data) / world.size)
    optimizer, scheduler, total_steps = build_optimizer(config, model, rows_per_process)
    if world.size > 1:
        torch.manual_seed(t.seed + world.rank)  # the same LoRA init, other dropout masks
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # The caller's hooks, copied: the run adds its own (AdaLoRA's) to the copy.
    hooks = (
        Hooks(**{f.name: copy.copy(getattr(hooks, f.name)) for f in fields(Hooks)})
        if hooks
        else Hooks()
    )
    if config.method == "lora" and config.lora.variant == "adalora":
        from lorakit.budget import RankBudget

        budget = RankBudget(model, config.lora, total_steps)
        hooks.loss_terms.append(budget.orth_loss)
        hooks.after_step.append(budget.step)
        hooks.stateful["adalora"] = budget
    weights = class_weights(t.class_weights, train_data.labels, train_ex.label_names)
    return Run(
        config=config,
        out=Path(t.output_dir),
        opt=Optimization(model, optimizer, scheduler, scaler),
        total_steps=total_steps,
        train_data=train_data,
        eval_data=eval_data,
        device=device,
        dtype=dtype,
        examples=train_ex,
        world=world,
        dev_data=dev_data,
        tokenizer=tokenizer,
        governor=thread_governor() if device.type == "cpu" else None,
        hooks=hooks,
        class_weights=None if weights is None else torch.tensor(weights, device=device),
    )


def _resume(run: Run, log: RunLog) -> LoopState:
    """The loop state, model, optimizer and generators as the checkpoint left them."""
    out = run.out
    state, rng = load_checkpoint(out / "checkpoint", run.opt, run.hooks.stateful)
    restore_rng(rng, run.world.rank)
    if not state.global_batch:  # written before positions counted steps, not batches
        state.batch_in_epoch //= _saved_config(out)["training"]["gradient_accumulation_steps"]
    log.rewrite_metrics(state.history)
    log.line(f"↻ Resumed from checkpoint at epoch {state.epoch + 1}, step {state.global_step}")
    return state


def _begin(run: Run, log: RunLog, stats: dict[str, float]) -> LoopState:
    """A fresh run: save its config.yaml and print the banner."""
    config, world, dev_data = run.config, run.world, run.dev_data
    if world.is_main:
        save_config(config, run.out / "config.yaml")
    where = f"cpu ({run.governor.describe()})" if run.governor is not None else str(run.device)
    processes = f" x {world.size} processes" if world.size > 1 else ""
    dev = f" / {len(dev_data):,} dev" if dev_data is not None else ""
    base = f" ({config.base_dtype} base)" if config.base_dtype != "fp32" else ""
    log.line(
        f"🚀 lorakit: {config.model_name} on {task_name(config)} | device {where}"
        f"{processes} | precision {precision_name(run.dtype)}{base} | {len(run.train_data):,} "
        f"train{dev} / {len(run.eval_data):,} eval examples"
    )
    log.line(format_parameter_stats(stats, _method_name(config)))
    weights = _weights_by_name(run)
    if weights:
        spelled = ", ".join(f"{name} {w:.4g}" for name, w in weights.items())
        log.line(f"  Loss weights per class ({config.training.class_weights}): {spelled}")
    if dev_data is not None:
        log.line(
            f"  best/ is chosen on the {len(dev_data):,} dev rows held out of the training "
            "data; the eval (validation) split is only reported"
        )
    return LoopState()


def _finish(
    run: Run, log: RunLog, state: LoopState, stats: dict[str, float], last_eval: dict[str, float]
) -> dict[str, Any]:
    """The summary (written with the training curves by rank 0) and the last line."""
    config, out, metric = run.config, run.out, run.examples.metric
    summary = _summary(config, state, stats, last_eval, metric)
    summary["precision"] = precision_name(run.dtype)
    summary["class_weights"] = _weights_by_name(run)
    budget = run.hooks.stateful.get("adalora")
    if budget is not None:
        summary["adalora_ranks"] = budget.final_ranks()
        summary["adalora_budget"] = {"start": budget.init_bgt, "end": sum(budget.ranks())}
    if run.world.is_main:
        plot_training_curves(state.history, out / "training_curves.png")
        if budget is not None and budget.history:
            layers = list(budget.final_ranks())
            plot_ranks(budget.history, layers, state.global_step, out / ADALORA_PLOT)
        write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    chosen = (
        f"Best dev {metric} {state.best_metric:.4f} (epoch {state.best_epoch}), "
        f"eval {metric} there {state.best_eval.get(metric, 0.0):.4f}"
        if run.dev_data is not None
        else f"Best eval {metric} {state.best_metric:.4f} (epoch {state.best_epoch})"
    )
    if budget is not None:
        ranks = list(summary["adalora_ranks"].values())
        log.line(
            f"  AdaLoRA: {budget.init_bgt} → {sum(ranks)} triplets, ranks {min(ranks)}-"
            f"{max(ranks)} per layer (summary.json: adalora_ranks; {ADALORA_PLOT})"
        )
    log.line(
        f"✅ Done. {chosen}; {summary['train_examples_per_sec']:.1f} examples/s; files in {out}"
    )
    return summary


def _saved_config(out: Path) -> dict[str, Any]:
    import yaml

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LoraKitError(f"--resume: cannot read {out}/config.yaml: {e}") from None
    if not isinstance(saved, dict):
        raise LoraKitError(f"--resume: {out}/config.yaml is not a run configuration")
    return saved


def _weights_by_name(run: Run) -> dict[str, float] | None:
    """The loss weight of each class, by label name (None: unweighted)."""
    if run.class_weights is None:
        return None
    weights = run.class_weights.tolist()
    return {name: round(w, 6) for name, w in zip(run.examples.label_names, weights, strict=True)}


def _method_name(config: Config) -> str:
    """What trains, for the banner: "LoRA r=8", "head only", "full fine-tuning"."""
    if config.method == "head":
        return "head only"
    if config.method == "full":
        return "full fine-tuning"
    what = config.lora.describe()
    base: list[str] = [config.quantize_base] if config.quantize_base != "none" else []
    base += ["bf16"] if config.base_dtype == "bf16" else []
    return f"{what}, {' '.join(base)} base" if base else what


def _summary(
    config: Config,
    state: LoopState,
    stats: dict[str, float],
    last_eval: dict[str, float],
    metric: str,
) -> dict[str, Any]:
    steady = (
        state.steady_examples / state.steady_seconds
        if state.steady_seconds
        else (state.train_examples / state.train_seconds if state.train_seconds else 0.0)
    )
    return {
        "method": config.method,
        "selected_on": "dev" if config.training.dev_split else "validation",
        "best_metric_name": metric,
        "best_metric": state.best_metric,
        "best_dev": state.best_dev,
        "best_eval_accuracy": state.best_eval.get("accuracy"),
        "best_epoch": state.best_epoch,
        "best_eval": state.best_eval,
        "final_eval": last_eval,
        "global_steps": state.global_step,
        "train_examples_per_sec": round(steady, 2),
        "train_runtime_s": round(state.runtime_seconds, 2),
        "train_step_seconds": round(state.train_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "trainable_params": int(stats["trainable"]),
        "adapter_params": int(stats["adapter"]),
        "quantize_base": config.quantize_base,
        "base_dtype": config.base_dtype,
        "quantized_base_bytes": int(stats["quantized_bytes"]),
        "total_params": int(stats["total"]),
        "num_epochs": config.training.num_epochs,
        "batch_size": config.training.batch_size,
        "processes": state.world_size,
        "global_batch": state.global_batch,
        "learning_rate": config.training.learning_rate,
    }
