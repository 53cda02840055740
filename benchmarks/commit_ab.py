"""Two commits of lorakit, paired: the shipped recipe's training step and the server's forward.

    .venv/bin/python benchmarks/commit_ab.py --base 5f24c4d [--head WORKTREE] --rounds 5

For a change that must not cost speed (a refactor of the core): the base commit is checked out
into a temporary worktree, and each round runs, in a fresh process per side and in alternating
order (base, head, then head, base), (1) ``--steps`` training steps of configs/sst2_minilm.yaml
on the same length-grouped SST-2 batches (median step seconds after 3 warm-up steps) and (2)
``AdapterSet.logits`` over ``--rows`` validation sentences with 8 adapters round-robin (the
mixed batch ``lorakit serve`` runs; median of ``--repeats``), and, with ``--http``, (3) a real
``lorakit serve`` holding the same 8 adapters under ``--clients`` closed-loop clients for
``--seconds`` (after 3 s of warm-up), requests round-robin over the adapters: requests/s.
Ratios are taken within a round (base time / head time, for HTTP 1/requests/s: above 1 means
head is faster) and reported as median (min-max) over rounds, with the machine, both commits
and the date; ``--out`` keeps the record (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from train_throughput import ROOT

CHILD = r"""
import json, statistics, sys, time
import numpy as np, torch
kind, data_dir, n, repeats, adapters_dir = sys.argv[1:6]
n, repeats = int(n), int(repeats)
torch.manual_seed(0)
if kind == "train":
    from lorakit.config import load_config
    from lorakit.data import batch_order, collate
    from lorakit.models import load_tokenizer
    from lorakit.train import build_model, build_optimizer, load_data
    overrides = {"data.data_dir": data_dir, "training.max_train_samples": 4096}
    config = load_config(sys.argv[6], overrides)
    t = config.training
    ex, data, _, _ = load_data(config, load_tokenizer(config.model_name))
    model = build_model(config, ex.label_names, torch.device("cpu")).train()
    opt, sched, _ = build_optimizer(config, model, len(ex.texts))
    order = batch_order(data.lengths, t.batch_size, t.seed, 0, t.group_by_length)
    times = []
    for i, idx in enumerate(order[: n + 3]):
        tick = time.perf_counter()
        model(**collate(data, idx)).loss.backward()
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - tick)
else:
    from pathlib import Path
    from lorakit.multi import AdapterSet
    lines = Path(data_dir, "sst2", "validation.tsv").read_text().splitlines()[1 : n + 1]
    texts = [line.split("\t")[0] for line in lines]
    served = AdapterSet("minilm")
    dirs = sorted(Path(adapters_dir).iterdir())
    for d in dirs:
        served.load(d.name, d)
    names = [dirs[i % len(dirs)].name for i in range(len(texts))]
    enc = served.tokenizer(texts, padding=True, truncation=True, max_length=128,
                           return_tensors="np")
    batch = {k: v.astype(np.int64) for k, v in enc.items()}
    served.logits(batch, names)
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        served.logits(batch, names)
        times.append(time.perf_counter() - tick)
print("RESULT " + json.dumps(statistics.median(times)))
"""


def measure(src: Path, kind: str, args: argparse.Namespace, adapters: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "LORAKIT_THREADS": str(args.threads)}
    n = args.steps if kind == "train" else args.rows
    cmd = [sys.executable, "-c", CHILD, kind, args.data_dir, str(n), str(args.repeats)]
    cmd += [str(adapters), str(ROOT / "configs" / "sst2_minilm.yaml")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"{kind} on {src} failed:\n{out.stderr[-3000:]}")
    return float(json.loads(lines[-1][7:]))


def http_seconds(src: Path, kind: str, args: argparse.Namespace, adapters: Path) -> float:
    """Seconds per request (1 / requests/s) of ``lorakit serve`` from ``src`` under load."""
    import asyncio

    from loadgen import closed_loop, running

    dirs = sorted(adapters.iterdir())
    command = [sys.executable, "-m", "lorakit", "serve", "--model", "minilm", "--host", "127.0.0.1"]
    command += [a for d in dirs for a in ("--adapter", f"{d.name}={d}")]
    lines = Path(args.data_dir, "sst2", "validation.tsv").read_text().splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines]

    def body(i: int) -> dict:
        return {"inputs": texts[i % len(texts)], "adapter": dirs[i % len(dirs)].name}

    env = {**os.environ, "PYTHONPATH": str(src), "LORAKIT_THREADS": str(args.threads)}
    with running(command, env) as proc:
        load = asyncio.run(closed_loop(proc.url, body, args.clients, 3 + args.seconds, 30.0))
    stats = load.stats(3, 3 + args.seconds)
    if stats["failed"]:
        sys.exit(f"lorakit serve from {src}: {stats['failed']} failed requests {stats['errors']}")
    return 1.0 / stats["requests_per_sec"]


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per process")
    p.add_argument("--rows", type=int, default=64, help="sentences in the served batch")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--http", action="store_true", help="also requests/s of lorakit serve")
    p.add_argument("--skip", default="", help="comma-separated measurements to leave out")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients (--http)")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds (--http)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "commit_ab.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import machine
    from serve_load import make_adapters

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            adapters = Path(tmp) / "adapters"
            make_adapters(adapters, 8)
            sides = {"base": base / "src", "head": ROOT / "src"}
            ratios: dict[str, list[float]] = {"train": [], "serve": []}
            if args.http:
                ratios["http"] = []
            for kind in args.skip.split(","):
                ratios.pop(kind, None)
            for r in range(args.rounds):
                order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
                for kind in ratios:
                    run = http_seconds if kind == "http" else measure
                    t = {side: run(sides[side], kind, args, adapters) for side in order}
                    ratios[kind].append(t["base"] / t["head"])
                    print(
                        f"round {r + 1} {kind}: base {t['base']:.4f} s, head {t['head']:.4f} s",
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    record = {
        "command": "benchmarks/commit_ab.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "base": git("rev-parse", "--short", args.base),
        "head": git("rev-parse", "--short", "HEAD")
        + (" (dirty)" if git("status", "--porcelain") else ""),
        "machine": machine(),
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for kind, values in ratios.items():
        print(
            f"{kind}: base/head time {statistics.median(values):.3f} "
            f"({min(values):.3f}-{max(values):.3f}) over {len(values)} rounds"
        )


if __name__ == "__main__":
    main()
