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
)
from lorakit.config import Config, save_config
from lorakit.data import Encoded, Examples, batch_order, collate, encode, load_examples
from lorakit.errors import LoraKitError
from lorakit.evaluate import evaluate
from lorakit.inject import apply_lora_to_model
from lorakit.models import canonical_name, load_model, load_tokenizer
from lorakit.paths import check_writable
from lorakit.plots import plot_training_curves
from lorakit.progress import Progress, progress
from lorakit.runlog import RunLog
from lorakit.runtime import amp_dtype, autocast, pick_device
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


def load_data(config: Config, tokenizer: Any) -> tuple[Examples, Encoded, Encoded]:
    """Training examples (for label names and metric) and both splits tokenized once."""
    t = config.training
    train_ex = load_examples(config.data, "train").head(t.max_train_samples)
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
    )


def build_model(config: Config, label_names: tuple[str, ...], device: torch.device) -> Any:
    """The base classifier with LoRA injected and only LoRA + head trainable."""
    lora = config.lora
    model = load_model(config.model_name, dict(enumerate(label_names)))
    apply_lora_to_model(model, lora.target_modules, lora.rank, lora.alpha, lora.dropout)
    mark_only_lora_as_trainable(model)
    if config.training.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model.to(device)  # type: ignore[arg-type]


def build_optimizer(config: Config, model: torch.nn.Module, n_train: int) -> tuple[Any, Any, int]:
    """AdamW over the trainable parameters, linear warmup then decay; and the total steps."""
    t = config.training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    batches = math.ceil(n_train / t.batch_size)
    total_steps = math.ceil(batches / t.gradient_accumulation_steps) * t.num_epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    warmup = int(t.warmup_ratio * total_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps), total_steps


def train(config: Config) -> dict[str, Any]:
    """Fine-tune as ``config`` says and return the run summary (also written to summary.json)."""
    out, t = check_output_dir(config), config.training
    if t.resume:
        check_resume(_saved_config(out), config.to_dict())
    device = pick_device(t.device)
    dtype = amp_dtype(t.precision, device)
    seed_everything(t.seed)
    train_ex, train_data, eval_data = load_data(config, load_tokenizer(config.model_name))
    model = build_model(config, train_ex.label_names, device)
    optimizer, scheduler, total_steps = build_optimizer(config, model, len(train_data))
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
    )
    stats = count_lora_parameters(model)
    # Only now, with everything loaded, is an old run's output replaced.
    if not t.resume:
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "training_log.txt", out / "metrics.jsonl")
    state = LoopState()
    if t.resume:
        state, rng = load_checkpoint(out / "checkpoint", run.opt)
        restore_rng(rng)
        log.rewrite_metrics(state.history)
        log.line(f"↻ Resumed from checkpoint at epoch {state.epoch + 1}, step {state.global_step}")
    else:
        save_config(config, out / "config.yaml")
        precision = str(dtype or torch.float32).removeprefix("torch.")
        log.line(
            f"🚀 lorakit: {config.model_name} on {_data_name(config)} | device {device} | "
            f"precision {precision} | {len(train_data):,} train / "
            f"{len(eval_data):,} eval examples"
        )
        log.line(format_parameter_stats(stats))
    loop = Loop(run, log, state)
    loop.run()
    loop.save_adapter(out / "final", loop.last_eval)
    plot_training_curves(state.history, out / "training_curves.png")
    summary = _summary(config, state, stats, loop.last_eval, train_ex.metric)
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.line(
        f"✅ Done. Best eval {train_ex.metric} {state.best_metric:.4f} (epoch "
        f"{state.best_epoch}); {summary['train_examples_per_sec']:.1f} examples/s; "
        f"files in {out}"
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
        "best_metric_name": metric,
        "best_metric": state.best_metric,
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
        self.stop_requested = False
        self.last_eval: dict[str, float] = state.best_eval
        self.rng_at_step = capture_rng()
        # loss*n, correct, n of the steps since the last metrics line
        self.sums = torch.tensor(state.window, device=run.device)
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
            batches = batch_order(
                self.train_data.lengths, t.batch_size, t.seed, s.epoch, t.group_by_length
            )
            self._epoch(batches)
            if self.stop_requested:
                self._checkpoint()
                raise Interrupted(
                    f"interrupted at step {s.global_step}; continue with "
                    f"--resume --output_dir {self.out}"
                )
            if s.batch_in_epoch >= len(batches):
                s.epoch += 1
                s.batch_in_epoch = 0
                self._eval(s.epoch)
            elif self._done():
                self._eval(round(s.epoch + s.batch_in_epoch / len(batches), 4))

    def _epoch(self, batches: list[np.ndarray]) -> None:
        s, t = self.state, self.t
        accum = t.gradient_accumulation_steps
        bar = progress(
            len(batches),
            f"Epoch {s.epoch + 1}/{t.num_epochs}",
            initial=s.batch_in_epoch,
            leave=False,
        )
        window = [0.0, 0]  # seconds, examples since the last log line
        while s.batch_in_epoch < len(batches) and not self._done() and not self.stop_requested:
            tick = time.perf_counter()
            end = min(len(batches), (s.batch_in_epoch // accum + 1) * accum)
            group = batches[s.batch_in_epoch : end]
            n_group = sum(len(b) for b in group)
            for b in group:
                self.sums += self._forward_backward(b, len(b) / n_group)
            self._optimizer_step()
            s.batch_in_epoch = end
            s.global_step += 1
            seconds = time.perf_counter() - tick
            self._count(seconds, n_group)
            window[0] += seconds
            window[1] += n_group
            bar.update(len(group))
            epoch = s.epoch + s.batch_in_epoch / len(batches)
            if s.global_step % t.logging_steps == 0 or s.batch_in_epoch >= len(batches):
                self._log_train(window, epoch, bar)
                self.sums.zero_()
                window = [0.0, 0]
            if (
                t.eval_steps
                and s.global_step % t.eval_steps == 0
                and s.batch_in_epoch < len(batches)
            ):
                self._eval(round(epoch, 4))
        bar.close()

    def _count(self, seconds: float, examples: int) -> None:
        s = self.state
        s.train_seconds += seconds
        s.train_examples += examples
        if s.global_step > STEADY_AFTER:
            s.steady_seconds += seconds
            s.steady_examples += examples

    def _forward_backward(self, idx: np.ndarray, weight: float) -> torch.Tensor:
        batch = {
            k: v.to(self.device, non_blocking=True)
            for k, v in collate(self.train_data, idx).items()
        }
        with autocast(self.device, self.dtype):
            out = self.model(**batch)
        loss = out.loss.float()
        self.scaler.scale(loss * weight).backward()
        n = len(idx)
        correct = (out.logits.argmax(-1) == batch["labels"]).sum()
        return torch.stack([loss.detach() * n, correct.float(), loss.new_tensor(float(n))])

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

    def _log_train(self, window: list, epoch: float, bar: Progress) -> None:
        loss_sum, correct, n = self.sums.tolist()
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
        metrics = evaluate(
            self.model, self.eval_data, self.t.eval_batch_size, self.device, self.dtype
        )
        self.model.train()
        record: dict[str, Any] = {"kind": "eval", "step": s.global_step, "epoch": epoch, **metrics}
        self.log.metrics(record)
        s.history.append(record)
        self.last_eval = metrics
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
        )
        value = float(metrics[self.metric])
        if s.best_metric is None or value > s.best_metric:
            s.best_metric, s.best_epoch, s.best_eval = value, record["epoch"], metrics
            self.save_adapter(self.out / "best", metrics)
            self.log.line(f"  💾 Best model saved! (eval_{self.metric}: {value:.4f})")
        self._checkpoint()

    def save_adapter(self, directory: Path, metrics: dict[str, float]) -> None:
        save_adapter(
            self.model,
            directory,
            base_model_name_or_path=canonical_name(self.c.model_name),
            task=_data_name(self.c),
            extra={
                "metrics": metrics,
                "max_length": self.t.max_length,
                "text_columns": list(self.job.examples.text_columns),
            },
        )

    def _checkpoint(self) -> None:
        self._update_runtime()
        self.state.window = self.sums.tolist()
        save_checkpoint(
            self.out / "checkpoint",
            self.job.opt,
            self.state,
            self.rng_at_step,
            canonical_name(self.c.model_name),
        )
