"""The training loop, written out: AdamW, warmup + linear decay, clipping, accumulation, autocast.

``train(config)`` writes DESIGN.md's output directory: best/, final/, checkpoint/, config.yaml,
metrics.jsonl, training_log.txt, training_curves.png and summary.json.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from lorakit.adapter import save_adapter
from lorakit.atomic import write_text
from lorakit.checkpoint import (
    LoopState,
    Optimization,
    capture_rng,
    check_resume,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    saved_world_size,
)
from lorakit.config import Config, save_config
from lorakit.data import Encoded, Examples, batch_order, collate, encode, hold_out, load_examples
from lorakit.distributed import World, start
from lorakit.dropout import use_fast_dropout
from lorakit.errors import LoraKitError
from lorakit.evaluate import evaluate_shared
from lorakit.inject import apply_ia3_to_model, apply_lora_to_model
from lorakit.models import canonical_name, load_model, load_tokenizer, save_model
from lorakit.paths import check_writable
from lorakit.plots import plot_training_curves
from lorakit.progress import Progress, progress
from lorakit.runlog import RunLog, SilentLog
from lorakit.runtime import amp_dtype, autocast, pick_device, precision_name, thread_governor
from lorakit.state import (
    count_lora_parameters,
    format_parameter_stats,
    mark_only_lora_as_trainable,
)

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
STEADY_AFTER = 5  # optimizer steps excluded from the steady-state throughput


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived; a checkpoint was saved."""


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
    for name in OUTPUTS:
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


def train(config: Config) -> dict[str, Any]:
    """Fine-tune as ``config`` says and return the run summary (also written to summary.json).

    Under torchrun every process runs this (``lorakit.distributed``); rank 0 alone writes.
    """
    world = start(pick_device(config.training.device))
    try:
        return _train(config, world)
    finally:
        world.close()


def _train(config: Config, world: World) -> dict[str, Any]:
    out, t = Path(config.training.output_dir), config.training
    if world.is_main:
        check_output_dir(config)
        if t.resume:
            saved_world = saved_world_size(out / "checkpoint")
            check_resume(_saved_config(out), config.to_dict(), saved_world, world.size)
    world.barrier()  # the others read output_dir once rank 0 has checked (and repaired) it
    device = world.device
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
    run = Run(
        config,
        out,
        Optimization(model, optimizer, scheduler, scaler),
        total_steps,
        train_data,
        eval_data,
        device,
        dtype,
        train_ex,
        world,
        dev_data,
        tokenizer,
    )
    stats = count_lora_parameters(model)
    if world.is_main:
        # Only now, with everything loaded, is an old run's output replaced.
        if not t.resume:
            clear_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "training_log.txt", out / "metrics.jsonl") if world.is_main else SilentLog()
    state = LoopState()
    if t.resume:
        state, rng = load_checkpoint(out / "checkpoint", run.opt)
        restore_rng(rng, world.rank)
        if not state.global_batch:  # written before positions counted steps, not batches
            state.batch_in_epoch //= _saved_config(out)["training"]["gradient_accumulation_steps"]
        log.rewrite_metrics(state.history)
        log.line(f"↻ Resumed from checkpoint at epoch {state.epoch + 1}, step {state.global_step}")
    else:
        if world.is_main:
            save_config(config, out / "config.yaml")
        where = f"cpu ({thread_governor().describe()})" if device.type == "cpu" else str(device)
        processes = f" x {world.size} processes" if world.size > 1 else ""
        dev = f" / {len(dev_data):,} dev" if dev_data is not None else ""
        log.line(
            f"🚀 lorakit: {config.model_name} on {_data_name(config)} | device {where}"
            f"{processes} | precision {precision_name(dtype)} | {len(train_data):,} train{dev} / "
            f"{len(eval_data):,} eval examples"
        )
        log.line(format_parameter_stats(stats, _method_name(config)))
        if dev_data is not None:
            log.line(
                f"  best/ is chosen on the {len(dev_data):,} dev rows held out of the training "
                "data; the eval (validation) split is only reported"
            )
    loop = Loop(run, log, state)
    loop.run()
    loop.save_adapter(out / "final", loop.last_eval, loop.last_dev)
    summary = _summary(config, state, stats, loop.last_eval, train_ex.metric)
    summary["precision"] = precision_name(dtype)
    if world.is_main:
        plot_training_curves(state.history, out / "training_curves.png")
        write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    chosen = (
        f"Best dev {train_ex.metric} {state.best_metric:.4f} (epoch {state.best_epoch}), "
        f"eval {train_ex.metric} there {state.best_eval.get(train_ex.metric, 0.0):.4f}"
        if dev_data is not None
        else f"Best eval {train_ex.metric} {state.best_metric:.4f} (epoch {state.best_epoch})"
    )
    log.line(
        f"✅ Done. {chosen}; {summary['train_examples_per_sec']:.1f} examples/s; files in {out}"
    )
    world.barrier()  # every process returns once rank 0's files are complete
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


@dataclass
class Run:
    """What one training run works on, built once by ``train``."""

    config: Config
    out: Path
    opt: Optimization
    total_steps: int
    train_data: Encoded
    eval_data: Encoded
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    examples: Examples  # the training rows: metric, label names, text columns
    world: World  # this process's place among torchrun's (World() for one process)
    dev_data: Encoded | None = None  # rows held out of training that choose best/
    tokenizer: Any = None  # saved beside whole models (method head or full)


def _method_name(config: Config) -> str:
    """What trains, for the banner: "LoRA r=8", "head only", "full fine-tuning"."""
    if config.method == "head":
        return "head only"
    if config.method == "full":
        return "full fine-tuning"
    return config.lora.describe()


def _data_name(config: Config) -> str:
    if config.data.train_file:
        return Path(config.data.train_file).stem
    return config.data.subset


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
        "total_params": int(stats["total"]),
        "num_epochs": config.training.num_epochs,
        "batch_size": config.training.batch_size,
        "processes": state.world_size,
        "global_batch": state.global_batch,
        "learning_rate": config.training.learning_rate,
    }


class Loop:
    """One training run's loop state and steps; ``run`` goes until the end or an interrupt."""

    def __init__(self, run: Run, log: RunLog, state: LoopState) -> None:
        self.job, self.log, self.state = run, log, state
        self.c, self.t = run.config, run.config.training
        self.model, self.optimizer = run.opt.model, run.opt.optimizer
        self.scheduler, self.scaler = run.opt.scheduler, run.opt.scaler
        self.train_data, self.eval_data = run.train_data, run.eval_data
        self.device, self.dtype, self.out = run.device, run.dtype, run.out
        self.metric, self.total_steps = run.examples.metric, run.total_steps
        self.world, self.ddp = run.world, run.world.wrap(self.model)  # ddp: what trains
        state.world_size = self.world.size
        state.global_batch = (
            self.t.batch_size * self.world.size * self.t.gradient_accumulation_steps
        )
        self.stop_requested = False
        self.last_eval: dict[str, float] = state.best_eval
        self.last_dev: dict[str, float] = state.best_dev
        self.rng_at_step = capture_rng()
        # loss*n, correct, n of this process's rows since the last metrics line (the saved
        # window, summed over the processes, restarts on rank 0)
        window = state.window if self.world.is_main else [0.0, 0.0, 0.0]
        self.sums = torch.tensor(window, device=run.device)
        self.runtime_base, self.started = state.runtime_seconds, time.perf_counter()

    def _update_runtime(self) -> None:
        self.state.runtime_seconds = self.runtime_base + time.perf_counter() - self.started

    def run(self) -> None:
        previous = {
            s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self._epochs()
        finally:
            self._update_runtime()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True

    def _done(self) -> bool:
        return self.state.global_step >= self.total_steps

    def _epochs(self) -> None:
        s, t = self.state, self.t
        self.model.train()
        while s.epoch < t.num_epochs and not self._done():
            # One global batch per optimizer step: its rows depend on the seed, the epoch and
            # the global batch only, not on how processes and accumulation split it.
            steps = batch_order(
                self.train_data.lengths, self.state.global_batch, t.seed, s.epoch, t.group_by_length
            )
            self._epoch(steps)
            if self.world.any(self.stop_requested):
                self._checkpoint()
                raise Interrupted(
                    f"interrupted at step {s.global_step}; continue with "
                    f"--resume --output_dir {self.out}"
                )
            if s.batch_in_epoch >= len(steps):
                s.epoch += 1
                s.batch_in_epoch = 0
                self._eval(s.epoch)
            elif self._done():
                self._eval(round(s.epoch + s.batch_in_epoch / len(steps), 4))

    def _epoch(self, steps: list[np.ndarray]) -> None:
        s, t = self.state, self.t
        micro = t.batch_size * self.world.size  # rows of one forward/backward, all processes
        bar = progress(
            len(steps),
            f"Epoch {s.epoch + 1}/{t.num_epochs}",
            initial=s.batch_in_epoch,
            leave=False,
            disable=not self.world.is_main,
        )
        window = [0.0, 0]  # seconds, examples since the last log line
        stop = False  # agreed by every process, so that all stop after the same step
        while s.batch_in_epoch < len(steps) and not self._done() and not stop:
            tick = time.perf_counter()
            rows = steps[s.batch_in_epoch]
            group = np.split(rows, range(micro, len(rows), micro))  # accumulation micro-batches
            for i, b in enumerate(group):
                with self.world.no_sync(self.ddp, sync=i == len(group) - 1):
                    self.sums += self._forward_backward(b, len(rows))
            self._optimizer_step()
            if self.device.type == "cpu":
                self._share_cpu()
            s.batch_in_epoch += 1
            s.global_step += 1
            seconds = time.perf_counter() - tick
            self._count(seconds, len(rows))
            window[0] += seconds
            window[1] += len(rows)
            bar.update(1)
            epoch = s.epoch + s.batch_in_epoch / len(steps)
            if s.global_step % t.logging_steps == 0 or s.batch_in_epoch >= len(steps):
                self._log_train(window, epoch, bar)
                self.sums.zero_()
                window = [0.0, 0]
            if t.eval_steps and s.global_step % t.eval_steps == 0 and s.batch_in_epoch < len(steps):
                self._eval(round(epoch, 4))
            stop = self.world.any(self.stop_requested)
        bar.close()

    def _count(self, seconds: float, examples: int) -> None:
        s = self.state
        s.train_seconds += seconds
        s.train_examples += examples
        if s.global_step > STEADY_AFTER:
            s.steady_seconds += seconds
            s.steady_examples += examples

    def _forward_backward(self, rows: np.ndarray, n_step: int) -> torch.Tensor:
        """Forward and backward of this process's share of ``rows`` (a micro-batch of every
        process), its mean loss weighted so that the gradient (summed over micro-batches,
        averaged over processes by DDP) is that of the mean loss over the step's ``n_step``
        rows, as one process running them all would get it."""
        mine = self.world.shard(rows)
        # A short last batch may leave this process no rows: it still runs one, weighted 0,
        # since DDP's all-reduce waits for every process's backward.
        idx = mine if len(mine) else rows[:1]
        batch = {
            k: v.to(self.device, non_blocking=True)
            for k, v in collate(self.train_data, idx).items()
        }
        with autocast(self.device, self.dtype):
            out = self.ddp(**batch)
        loss = out.loss.float()
        with self.world.peers():
            self.scaler.scale(loss * (len(mine) / n_step * self.world.size)).backward()
        n = len(mine)
        correct = (out.logits.argmax(-1) == batch["labels"]).sum() * bool(n)
        return torch.stack([loss.detach() * n, correct.float(), loss.new_tensor(float(n))])

    def _share_cpu(self) -> None:
        """Let the thread governor follow other processes' load; say so when it changes."""
        before = torch.get_num_threads()
        now = thread_governor().poll()
        if now != before and self.world.is_main:
            self.log.line(
                f"  ⚙ step {self.state.global_step + 1}: {now} torch thread"
                f"{'s' if now != 1 else ''} (was {before}): other processes' use of the cores "
                "changed (LORAKIT_THREADS=N pins the count)"
            )

    def _optimizer_step(self) -> None:
        if self.t.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.t.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.rng_at_step = capture_rng()

    def _gather_window(self) -> list[float]:
        """The window's sums over every process, kept on rank 0 (the others restart at 0)."""
        total = self.world.sum(self.sums)
        self.sums.copy_(total if self.world.is_main else torch.zeros_like(total))
        return total.tolist()

    def _log_train(self, window: list, epoch: float, bar: Progress) -> None:
        loss_sum, correct, n = self._gather_window()
        seconds, examples = window
        record = {
            "kind": "train",
            "step": self.state.global_step,
            "epoch": round(epoch, 4),
            "loss": loss_sum / max(n, 1),
            "accuracy": correct / max(n, 1),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "examples_per_sec": round(examples / seconds, 2) if seconds else 0.0,
        }
        self.log.metrics(record)
        self.state.history.append(record)
        bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            acc=f"{record['accuracy']:.4f}",
            ex_s=f"{record['examples_per_sec']:.0f}",
        )

    def _eval(self, epoch: float) -> None:
        s = self.state
        metrics = evaluate_shared(
            self.model, self.eval_data, self.t.eval_batch_size, self.device, self.dtype, self.world
        )
        dev: dict[str, float] = {}
        if self.job.dev_data is not None:
            dev = evaluate_shared(
                self.model,
                self.job.dev_data,
                self.t.eval_batch_size,
                self.device,
                self.dtype,
                self.world,
            )
        self.model.train()
        record: dict[str, Any] = {
            "kind": "eval",
            "step": s.global_step,
            "epoch": epoch,
            **metrics,
            **{f"dev_{k}": v for k, v in dev.items()},
        }
        self.log.metrics(record)
        s.history.append(record)
        self.last_eval, self.last_dev = metrics, dev
        recent = [r for r in s.history if r["kind"] == "train"][-1:]
        train_part = (
            f"Train Loss: {recent[0]['loss']:.4f} | Train Acc: {recent[0]['accuracy']:.4f}"
            if recent
            else ""
        )
        self.log.line(
            f"📝 Epoch {record['epoch']}/{self.t.num_epochs} (step {s.global_step})\n"
            f"  {train_part}\n"
            f"  Eval Loss:  {metrics['loss']:.4f} | Eval Acc:  {metrics['accuracy']:.4f}"
            + (f" | Eval F1: {metrics['f1']:.4f}" if self.metric == "f1" else "")
            + (f" | MCC: {metrics['matthews']:.4f}" if self.metric == "matthews" else "")
            + (
                f"\n  Dev Loss:   {dev['loss']:.4f} | Dev {self.metric}: {dev[self.metric]:.4f}"
                if dev
                else ""
            )
        )
        chooser = "dev" if dev else "eval"
        value = float((dev or metrics)[self.metric])
        if s.best_metric is None or value > s.best_metric:
            s.best_metric, s.best_epoch, s.best_eval, s.best_dev = (
                value,
                record["epoch"],
                metrics,
                dev,
            )
            self.save_adapter(self.out / "best", metrics, dev)
            self.log.line(f"  💾 Best model saved! ({chooser}_{self.metric}: {value:.4f})")
        self._checkpoint()

    def save_adapter(
        self, directory: Path, metrics: dict[str, float], dev: dict[str, float] | None = None
    ) -> None:
        """The adapter (or, for method head and full, the whole model) with its metrics."""
        if not self.world.is_main:
            return
        extra: dict[str, Any] = {
            "metrics": metrics,
            "max_length": self.t.max_length,
            "text_columns": list(self.job.examples.text_columns),
        }
        if dev:
            extra["dev_metrics"] = dev
        if self.c.method != "lora":
            extra.update(method=self.c.method, task=_data_name(self.c))
            save_model(self.model, self.job.tokenizer, directory, extra)
            return
        save_adapter(
            self.model,
            directory,
            base_model_name_or_path=canonical_name(self.c.model_name),
            task=_data_name(self.c),
            extra=extra,
        )

    def _checkpoint(self) -> None:
        self._update_runtime()
        self.state.window = self._gather_window()
        rngs = self.world.gather(self.rng_at_step)  # every process's generators
        if self.world.is_main:
            save_checkpoint(
                self.out / "checkpoint",
                self.job.opt,
                self.state,
                {**rngs[0], "ranks": rngs} if len(rngs) > 1 else rngs[0],
                canonical_name(self.c.model_name),
            )
        self.world.barrier()  # no process goes on (or ends) before the checkpoint is whole
