"""Does torch.compile pay for training here? A paired A/B of lorakit's eager step against the
same recipe compiled with inductor (dynamic shapes, torch's own dropout, which inductor fuses).

    .venv/bin/python benchmarks/train_compile_ab.py --data_dir ../shared/data --batches 40

Two copies of the shipped recipe's model (benchmarks/profile_step.py's ``recipe``). The
compiled copy has lorakit's ``FastDropout`` swapped back to ``nn.Dropout``, because the fast
mask draws its seed with ``.item()``, which breaks the graph. The compiled copy first warms up on
8 batches of different lengths, and that time, compiling included, is reported. Then each of
``--batches`` batches runs under both copies in alternating order. Prints a markdown table and
appends it to docs/benchmarks-log.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import time

import torch
from profile_step import recipe
from train_throughput import cpu_name, publish

from lorakit.dropout import FastDropout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="../shared/data")
    p.add_argument("--config", default="configs/sst2_minilm.yaml")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--no_docs", action="store_true", help="print only")
    args = p.parse_args()
    torch._logging.set_logs(dynamo=logging.ERROR)
    overrides = {"training.max_train_samples": 4000}
    eager = recipe(args.config, args.data_dir, overrides)
    compiled = recipe(args.config, args.data_dir, overrides)
    for m in compiled.model.modules():
        if isinstance(m, FastDropout):
            m.__class__ = torch.nn.Dropout
    tick = time.perf_counter()
    compiled.model.forward = torch.compile(compiled.model.forward, dynamic=True)
    for idx in eager.order[:8]:
        compiled.train_step(idx)
    warm = time.perf_counter() - tick
    for idx in eager.order[:3]:
        eager.train_step(idx)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i, idx in enumerate(eager.order[8 : 8 + args.batches]):
        for name in ("eager", "compiled") if i % 2 else ("compiled", "eager"):
            r = eager if name == "eager" else compiled
            tick = time.perf_counter()
            r.train_step(idx)
            times[name].append(time.perf_counter() - tick)
    paired = statistics.median(
        [e / c for e, c in zip(times["eager"], times["compiled"], strict=True)]
    )
    total = sum(times["eager"]) / sum(times["compiled"])
    lines = [
        f"### torch.compile for training, paired A/B, {datetime.date.today()}",
        "",
        f"Command: `.venv/bin/python benchmarks/train_compile_ab.py --data_dir {args.data_dir} "
        f"--batches {args.batches}`  ",
        f"Machine: {cpu_name()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"fp32. Compiling and the first 8 steps took {warm:.0f} s.",
        "",
        "| variant | median step ms |",
        "|---|---:|",
        *(f"| {k} | {1e3 * statistics.median(v):.1f} |" for k, v in times.items()),
        "",
        f"Speed-up of compiled over eager: {paired:.3f}x (median of paired ratios), "
        f"{total:.3f}x (total time).",
    ]
    publish("\n".join(lines) + "\n", args.no_docs)


if __name__ == "__main__":
    main()
