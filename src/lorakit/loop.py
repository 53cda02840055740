"""The training loop: epochs of optimizer steps, evaluation, best/, exact-resume checkpoints.

``train.py`` sets a run up (data, model, optimizer) as one ``Run``; ``Loop`` runs it and
changes nothing else. ``Hooks`` are where other code joins the loop without editing it: extra
loss terms, callbacks after backward and after the optimizer step, metric listeners.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.adapter import save_adapter
from lorakit.checkpoint import LoopState, Optimization, capture_rng, save_checkpoint
from lorakit.classes import weighted_loss
from lorakit.config import Config
from lorakit.data import Encoded, Examples, batch_order, collate
from lorakit.distributed import World
from lorakit.evaluate import evaluate_shared
from lorakit.models import canonical_name, save_model
from lorakit.progress import Progress, progress
from lorakit.runlog import RunLog
from lorakit.runtime import ThreadGovernor, autocast

STEADY_AFTER = 5  # optimizer steps excluded from the steady-state throughput

LossTerm = Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, outputs) -> scalar
StepHook = Callable[[torch.nn.Module, int], None]  # (model, step)
Listener = Callable[[dict[str, Any], int], None]  # (record, step)


@dataclass
class Hooks:
    """Code that joins the loop: each list empty by default, and then one check per step.

    - ``loss_terms``: ``term(model, outputs)`` returns a scalar added to each micro-batch's
      task loss before backward (in fp32, outside autocast), weighted as that loss is: a term
      that is the same for every micro-batch adds itself once to the step's mean loss.
      ``outputs`` is the model's output (``.loss``, ``.logits``); the logged loss stays the
      task loss.
    - ``after_backward``: ``hook(model, step)`` once per optimizer step, after every
      micro-batch's backward, before clipping and the optimizer: ``p.grad`` holds the step's
      gradients (averaged over processes; under fp16 still multiplied by the loss scale).
    - ``after_step``: ``hook(model, step)`` after the optimizer and scheduler stepped, before
      the gradients are cleared.
    - ``on_eval``: ``listener(record, step)`` with each evaluation's record as metrics.jsonl
      holds it, once best/ and the checkpoint are saved. ``on_train_log``: the same for each
      training metrics line. Each gets its own copy of the record.

    ``model`` is the model itself, not torchrun's DDP wrapper; ``step`` counts optimizer steps
    from 1, as metrics.jsonl does. Under torchrun every process calls its hooks (the records
    are the same on each): a tracker writes only where ``lorakit.distributed.is_main()``.

    Exact resume: the checkpoint holds the model, optimizer, scheduler, loop position and the
    random generators as each step left them (what loss terms and step hooks draw included;
    listeners should draw nothing). A hook that keeps state across steps (running averages,
    a schedule) puts an object with ``state_dict``/``load_state_dict`` in ``stateful`` under
    a name: the checkpoint saves and restores it beside the optimizer (AdaLoRA's budget).
    """

    loss_terms: list[LossTerm] = field(default_factory=list)
    after_backward: list[StepHook] = field(default_factory=list)
    after_step: list[StepHook] = field(default_factory=list)
    on_eval: list[Listener] = field(default_factory=list)
    on_train_log: list[Listener] = field(default_factory=list)
    stateful: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Run:
    """What one training run works on, built once by ``train.build_run``."""

    config: Config
    out: Path
    opt: Optimization  # what each step changes, and a checkpoint restores
    total_steps: int
    train_data: Encoded
    eval_data: Encoded
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    examples: Examples  # the training rows: metric, label names, text columns
    world: World  # this process's place among torchrun's (World() for one process)
    dev_data: Encoded | None = None  # rows held out of training that choose best/
    tokenizer: Any = None  # saved beside whole models (method head or full)
    governor: ThreadGovernor | None = None  # CPU runs: threads follow other processes' load
    hooks: Hooks = field(default_factory=Hooks)
    class_weights: torch.Tensor | None = None  # per class, on ``device``; None: plain loss


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived; a checkpoint was saved."""


def task_name(config: Config) -> str:
    """The task an adapter is for: the training file's stem, or the GLUE subset."""
    if config.data.train_file:
        return Path(config.data.train_file).stem
    return config.data.subset


class Loop:
    """One training run's loop state and steps; ``run`` goes until the end or an interrupt."""

    def __init__(self, run: Run, log: RunLog, state: LoopState) -> None:
        # The run is read where it is used, not copied (``job``: ``run`` is the method).
        self.job, self.log, self.state = run, log, state
        self.t = run.config.training
        # What every step changes, held directly: the step reads them for each micro-batch.
        self.model, self.optimizer = run.opt.model, run.opt.optimizer
        self.scheduler, self.scaler = run.opt.scheduler, run.opt.scaler
        self.ddp = run.world.wrap(self.model)  # what trains: the model, or DDP around it
        state.world_size = run.world.size
        state.global_batch = self.t.batch_size * run.world.size * self.t.gradient_accumulation_steps
        self.stop_requested = False
        self.last_eval: dict[str, float] = state.best_eval
        self.last_dev: dict[str, float] = state.best_dev
        self.rng_at_step = capture_rng()
        # loss*n, correct, n of this process's rows since the last metrics line (the saved
        # window, summed over the processes, restarts on rank 0)
        window = state.window if run.world.is_main else [0.0, 0.0, 0.0]
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
        return self.state.global_step >= self.job.total_steps

    def _epochs(self) -> None:
        s, t = self.state, self.t
        self.model.train()
        while s.epoch < t.num_epochs and not self._done():
            # One global batch per optimizer step: its rows depend on the seed, the epoch and
            # the global batch only, not on how processes and accumulation split it.
            steps = batch_order(
                self.job.train_data.lengths, s.global_batch, t.seed, s.epoch, t.group_by_length
            )
            self._epoch(steps)
            if self.job.world.any(self.stop_requested):
                self._checkpoint()
                raise Interrupted(
                    f"interrupted at step {s.global_step}; continue with "
                    f"--resume --output_dir {self.job.out}"
                )
            if s.batch_in_epoch >= len(steps):
                s.epoch += 1
                s.batch_in_epoch = 0
                self._eval(s.epoch)
            elif self._done():
                self._eval(round(s.epoch + s.batch_in_epoch / len(steps), 4))

    def _epoch(self, steps: list[np.ndarray]) -> None:
        s, t, world = self.state, self.t, self.job.world
        micro = t.batch_size * world.size  # rows of one forward/backward, all processes
        bar = progress(
            len(steps),
            f"Epoch {s.epoch + 1}/{t.num_epochs}",
            initial=s.batch_in_epoch,
            leave=False,
            disable=not world.is_main,
        )
        window = [0.0, 0]  # seconds, examples since the last log line
        stop = False  # agreed by every process, so that all stop after the same step
        while s.batch_in_epoch < len(steps) and not self._done() and not stop:
            tick = time.perf_counter()
            rows = steps[s.batch_in_epoch]
            group = np.split(rows, range(micro, len(rows), micro))  # accumulation micro-batches
            for i, b in enumerate(group):
                with world.no_sync(self.ddp, sync=i == len(group) - 1):
                    self.sums += self._forward_backward(b, rows)
            self._optimizer_step()
            if self.job.governor is not None:
                self._share_cpu(self.job.governor)
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
            stop = world.any(self.stop_requested)
        bar.close()

    def _count(self, seconds: float, examples: int) -> None:
        s = self.state
        s.train_seconds += seconds
        s.train_examples += examples
        if s.global_step > STEADY_AFTER:
            s.steady_seconds += seconds
            s.steady_examples += examples

    def _forward_backward(self, rows: np.ndarray, step_rows: np.ndarray) -> torch.Tensor:
        """Forward and backward of this process's share of ``rows`` (a micro-batch of every
        process), its mean loss weighted so that the gradient (summed over micro-batches,
        averaged over processes by DDP) is that of the mean loss over the step's rows
        (``step_rows``), as one process running them all would get it.

        With class weights the loss is ``CrossEntropyLoss(weight=w)``'s over the step's rows,
        ``Σ w_y·loss / Σ w_y``: each micro-batch adds its ``Σ w_y·loss`` over the step's
        ``Σ w_y``, which every process computes from the step's labels, so the split into
        processes and micro-batches changes nothing here either."""
        run = self.job
        n_step = len(step_rows)
        mine = run.world.shard(rows)
        # A short last batch may leave this process no rows: it still runs one, weighted 0,
        # since DDP's all-reduce waits for every process's backward.
        idx = mine if len(mine) else rows[:1]
        batch = {
            k: v.to(run.device, non_blocking=True) for k, v in collate(run.train_data, idx).items()
        }
        with autocast(run.device, run.dtype):
            out = self.ddp(**batch)
        n = len(mine)
        share = n / n_step  # this micro-batch's part of the step's mean loss
        if run.class_weights is None:
            loss = out.loss.float()
        else:
            w = run.class_weights
            loss, mine_w = weighted_loss(out.logits, batch["labels"], w)
            step_w = w.cpu()[torch.as_tensor(run.train_data.labels[step_rows])].sum()
            share = float(mine_w) / float(step_w) * bool(n)
        objective = loss
        for term in run.hooks.loss_terms:
            objective = objective + term(self.model, out)
        with run.world.peers():
            self.scaler.scale(objective * (share * run.world.size)).backward()
        correct = (out.logits.argmax(-1) == batch["labels"]).sum() * bool(n)
        return torch.stack([loss.detach() * n, correct.float(), loss.new_tensor(float(n))])

    def _share_cpu(self, governor: ThreadGovernor) -> None:
        """Let the thread governor follow other processes' load; say so when it changes."""
        before = torch.get_num_threads()
        now = governor.poll()
        if now != before and self.job.world.is_main:
            self.log.line(
                f"  ⚙ step {self.state.global_step + 1}: {now} torch thread"
                f"{'s' if now != 1 else ''} (was {before}): other processes' use of the cores "
                "changed (LORAKIT_THREADS=N pins the count)"
            )

    def _optimizer_step(self) -> None:
        hooks, step = self.job.hooks, self.state.global_step + 1
        for hook in hooks.after_backward:
            hook(self.model, step)
        if self.t.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.t.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        for hook in hooks.after_step:
            hook(self.model, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.rng_at_step = capture_rng()  # after the hooks: what they drew is part of the step

    def _gather_window(self) -> list[float]:
        """The window's sums over every process, kept on rank 0 (the others restart at 0)."""
        total = self.job.world.sum(self.sums)
        self.sums.copy_(total if self.job.world.is_main else torch.zeros_like(total))
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
        for listener in self.job.hooks.on_train_log:
            listener(dict(record), self.state.global_step)

    def _eval(self, epoch: float) -> None:
        s = self.state
        metrics, dev = self._evaluate()
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
        self.log.line(
            _eval_report(record, recent, dev, self.job.examples.metric, self.t.num_epochs)
        )
        self._keep_if_best(epoch, metrics, dev)
        self._checkpoint()
        for listener in self.job.hooks.on_eval:
            listener(dict(record), s.global_step)

    def _evaluate(self) -> tuple[dict[str, float], dict[str, float]]:
        """The validation metrics, and the dev rows' (empty without ``dev_split``)."""
        run = self.job

        def on(data: Encoded) -> dict[str, float]:
            size = self.t.eval_batch_size
            return evaluate_shared(self.model, data, size, run.device, run.dtype, run.world)

        metrics = on(run.eval_data)
        dev = on(run.dev_data) if run.dev_data is not None else {}
        self.model.train()
        return metrics, dev

    def _keep_if_best(self, epoch: float, metrics: dict[str, float], dev: dict[str, float]) -> None:
        """Save best/ when the dev score (else the validation score) beats every earlier one."""
        s, metric = self.state, self.job.examples.metric
        chooser = "dev" if dev else "eval"
        value = float((dev or metrics)[metric])
        if s.best_metric is None or value > s.best_metric:
            s.best_metric, s.best_epoch, s.best_eval, s.best_dev = value, epoch, metrics, dev
            self.save_adapter(self.job.out / "best", metrics, dev)
            self.log.line(f"  💾 Best model saved! ({chooser}_{metric}: {value:.4f})")

    def save_adapter(
        self, directory: Path, metrics: dict[str, float], dev: dict[str, float] | None = None
    ) -> None:
        """The adapter (or, for method head and full, the whole model) with its metrics."""
        run, c = self.job, self.job.config
        if not run.world.is_main:
            return
        extra: dict[str, Any] = {
            "metrics": metrics,
            "max_length": self.t.max_length,
            "text_columns": list(run.examples.text_columns),
        }
        if dev:
            extra["dev_metrics"] = dev
        if run.class_weights is not None:
            names = run.examples.label_names
            extra["class_weights"] = dict(zip(names, run.class_weights.tolist(), strict=True))
        if c.method != "lora":
            extra.update(method=c.method, task=task_name(c))
            save_model(self.model, run.tokenizer, directory, extra)
            return
        save_adapter(
            self.model,
            directory,
            base_model_name_or_path=canonical_name(c.model_name),
            task=task_name(c),
            extra=extra,
        )

    def _checkpoint(self) -> None:
        self._update_runtime()
        self.state.window = self._gather_window()
        world = self.job.world
        rngs = world.gather(self.rng_at_step)  # every process's generators
        if world.is_main:
            save_checkpoint(
                self.job.out / "checkpoint",
                self.job.opt,
                self.state,
                {**rngs[0], "ranks": rngs} if len(rngs) > 1 else rngs[0],
                canonical_name(self.job.config.model_name),
                self.job.hooks.stateful,
            )
        world.barrier()  # no process goes on (or ends) before the checkpoint is whole


def _eval_report(
    record: dict[str, Any],
    recent: list[dict[str, Any]],
    dev: dict[str, float],
    metric: str,
    epochs: int,
) -> str:
    """The log's block for one evaluation: the last train line's numbers, eval's, dev's."""
    train_part = (
        f"Train Loss: {recent[0]['loss']:.4f} | Train Acc: {recent[0]['accuracy']:.4f}"
        if recent
        else ""
    )
    return (
        f"📝 Epoch {record['epoch']}/{epochs} (step {record['step']})\n"
        f"  {train_part}\n"
        f"  Eval Loss:  {record['loss']:.4f} | Eval Acc:  {record['accuracy']:.4f}"
        + (f" | Eval F1: {record['f1']:.4f}" if metric == "f1" else "")
        + (f" | MCC: {record['matthews']:.4f}" if metric == "matthews" else "")
        + (f"\n  Dev Loss:   {dev['loss']:.4f} | Dev {metric}: {dev[metric]:.4f}" if dev else "")
    )
