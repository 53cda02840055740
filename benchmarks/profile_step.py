"""Where a lorakit training step and a prediction batch spend their time, against the compute bound.

    .venv/bin/python benchmarks/profile_step.py --data_dir ../shared/data

Training: the shipped SST-2 recipe (configs/sst2_minilm.yaml: MiniLM, LoRA r=32 on
query/key/value/dense, r=8 in the log's figures before 2026-11-30; batch 32, length-grouped
batches), the same calls as ``lorakit train``'s loop (collate, forward, backward, clip, AdamW,
scheduler). Inference: the merged model over the validation split in length-sorted batches of
64, as ``lorakit predict`` runs it.

For each it reports: FLOPs per example counted by ``torch.utils.flop_counter`` on the very
batches timed, the measured examples/s, the fp32 matmul peak of this CPU, and so the bound
(peak / FLOPs per example) and the fraction of it reached; then a torch.profiler table of the
operators that take the time. Prints markdown and appends it to docs/benchmarks-log.md.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode
from train_throughput import cpu_name, publish

from lorakit.config import load_config
from lorakit.data import Encoded, batch_order, collate, eval_order
from lorakit.models import load_tokenizer
from lorakit.state import unwrap_lora
from lorakit.train import build_model, build_optimizer, load_data

Step = Callable[[np.ndarray], None]


def matmul_peak_gflops(seconds: float = 2.0) -> float:
    """The best fp32 GFLOP/s of large matmuls in this model's shapes (QKV/out, FFN up, down)."""
    best = 0.0
    for m, k, n in ((2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384)):
        a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        for _ in range(5):
            torch.mm(a, b, out=c)
        count, tick = 0, time.perf_counter()
        while time.perf_counter() - tick < seconds:
            torch.mm(a, b, out=c)
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - tick) / 1e9)
    return best


def flops_of(step: Step, batches: list[np.ndarray]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        for idx in batches:
            step(idx)
    return float(counter.get_total_flops())


def timed(step: Step, batches: list[np.ndarray]) -> float:
    tick = time.perf_counter()
    for idx in batches:
        step(idx)
    return time.perf_counter() - tick


def op_table(step: Step, batches: list[np.ndarray], rows: int) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for idx in batches:
            step(idx)
    events = [e for e in prof.key_averages() if not e.key.startswith(("phase:", "ProfilerStep"))]
    total = sum(e.self_cpu_time_total for e in events)
    phases = {
        e.key[6:]: e.cpu_time_total / 1e3 / len(batches)
        for e in prof.key_averages()
        if e.key.startswith("phase:")
    }
    lines = [
        "Per-step phases: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items())
        + f" (profiled over {len(batches)} batches).",
        "",
        "| operator | self CPU % | calls/step |",
        "|---|---:|---:|",
    ]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        lines.append(
            f"| `{e.key}` | {100 * e.self_cpu_time_total / total:.1f} | "
            f"{e.count / len(batches):.0f} |"
        )
    return lines


def padded_tokens(data: Encoded, batches: list[np.ndarray]) -> tuple[float, float]:
    real = sum(int(data.lengths[b].sum()) for b in batches)
    padded = sum(int(data.lengths[b].max()) * len(b) for b in batches)
    n = sum(len(b) for b in batches)
    return real / n, padded / n


def section(
    title: str,
    step: Step,
    data: Encoded,
    batches: list[np.ndarray],
    peak: float,
    rows: int,
) -> list[str]:
    n = sum(len(b) for b in batches)
    flops = flops_of(step, batches) / n
    seconds = timed(step, batches)
    rate = n / seconds
    bound = peak * 1e9 / flops
    real, padded = padded_tokens(data, batches)
    return [
        f"**{title}** ({n} examples, {real:.1f} real / {padded:.1f} padded tokens per example)",
        "",
        "| FLOPs per example | examples/s | GFLOP/s reached | compute bound examples/s "
        "| fraction of bound |",
        "|---:|---:|---:|---:|---:|",
        f"| {flops / 1e6:.0f} M | {rate:.1f} | {rate * flops / 1e9:.1f} | {bound:.0f} | "
        f"{rate / bound:.0%} |",
        "",
        *op_table(step, batches[: max(4, len(batches) // 4)], rows),
        "",
    ]


@dataclass
class Recipe:
    """A config's training step and merged prediction batch, as lorakit runs them."""

    train_step: Step
    predict_step: Step
    train_data: Encoded
    eval_data: Encoded
    order: list[np.ndarray]  # the first epoch's training batches, in the run's order
    model: torch.nn.Module
    batch_size: int

    def merge_for_prediction(self) -> None:
        self.model.eval()
        unwrap_lora(self.model)  # merges, then restores the plain base layers


def recipe(
    config_path: str,
    data_dir: str,
    overrides: dict | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> Recipe:
    """``prepare`` may change what trains before the optimizer is built."""
    torch.manual_seed(0)
    config = load_config(config_path, {"data.data_dir": data_dir, **(overrides or {})})
    t = config.training
    tokenizer = load_tokenizer(config.model_name)
    train_ex, train_data, eval_data, _ = load_data(config, tokenizer)
    model = build_model(config, train_ex.label_names, torch.device("cpu"))
    if prepare is not None:
        prepare(model)
    optimizer, scheduler, _ = build_optimizer(config, model, len(train_ex.texts))
    params = [q for g in optimizer.param_groups for q in g["params"]]

    def train_step(idx: np.ndarray) -> None:
        batch = collate(train_data, idx)
        with record_function("phase:forward"):
            loss = model(**batch).loss
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:optimizer"):
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    def predict_step(idx: np.ndarray) -> None:
        with torch.inference_mode(), record_function("phase:forward"):
            model(**{k: v for k, v in collate(eval_data, idx).items() if k != "labels"})

    order = batch_order(train_data.lengths, t.batch_size, t.seed, 0, t.group_by_length)
    model.train()
    return Recipe(train_step, predict_step, train_data, eval_data, order, model, t.batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--config", default="configs/sst2_minilm.yaml")
    p.add_argument("--train_batches", type=int, default=60)
    p.add_argument("--rows", type=int, default=12, help="operators listed per table")
    p.add_argument("--no_docs", action="store_true", help="print only")
    args = p.parse_args()
    r = recipe(args.config, args.data_dir)
    peak = matmul_peak_gflops()
    for idx in r.order[:5]:  # warm-up: allocator, first optimizer step
        r.train_step(idx)
    lines = [
        f"### Profile: training step and prediction vs the compute bound, {datetime.date.today()}",
        "",
        f"Command: `.venv/bin/python benchmarks/profile_step.py --data_dir {args.data_dir} "
        f"--train_batches {args.train_batches}`  ",
        f"Machine: {cpu_name()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"fp32. Measured fp32 matmul peak (best of 2048-row matmuls in the model's shapes): "
        f"{peak:.1f} GFLOP/s.",
        "",
    ]
    lines += section(
        f"Training, {args.config}, batch {r.batch_size}",
        r.train_step,
        r.train_data,
        r.order[5 : 5 + args.train_batches],
        peak,
        args.rows,
    )
    r.merge_for_prediction()
    lines += section(
        "Prediction, merged, batch 64 length-sorted",
        r.predict_step,
        r.eval_data,
        eval_order(r.eval_data.lengths, 64),
        peak,
        args.rows,
    )
    publish("\n".join(lines), args.no_docs)


if __name__ == "__main__":
    main()
