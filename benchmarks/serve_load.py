"""Serving under load: ``lorakit serve`` vs the FastAPI + PEFT server a user would write today.

    .venv/bin/python benchmarks/serve_load.py --data_dir ../shared/data

Sections (``--sections``, all by default), each checked against the issue's target:

- servers: closed-loop clients (``--clients``) send SST-2 validation sentences to
  ``lorakit serve`` and to benchmarks/peft_server.py (set_adapter + one forward per request),
  both holding a0..a7, over K=1 adapter (every request names a0) and K=8 (requests take
  a0..a7 round-robin, so batches mix adapters); ``--rounds`` times, servers and K taking
  turns, so that a slow minute of the machine hits both sides of a ratio; medians over the
  rounds. Targets: K=8 keeps >= 80% of K=1's requests/s; at the most clients lorakit has
  >= 3x PEFT's requests/s and a lower p99.
- inprocess: the same ``--rows`` sentences, adapters round-robin, one padded batch:
  ``AdapterSet.logits`` against PEFT's ``model(**batch, adapter_names=...)``, median of
  ``--repeats`` taken in turns; target >= 1.2x; the logits must agree.
- memory: ``lorakit serve`` RSS with 1 adapter and with 8, after the same load; target
  <= 1.1x.
- soak: ``--soak_clients`` for ``--soak_seconds``, 8 adapters mixed: zero failed requests,
  RSS within 5% between the first and the last ``--soak_window`` requests.

The adapters are MiniLM LoRA r=8 (alpha 8, query/key/value/dense, the SST-2 config's rank
until 2026-11-30) with seeded random weights: throughput does not depend on their values. One
server runs at a time, with torch's default threads; the clients share the machine. Figures go
to ``--out`` (JSON; sections run separately are merged into it) and the tables to the same name
.md. About 15 minutes with the defaults. Run it on an otherwise idle machine: with 2 cores, one
other busy process slows torch's threads (and so every figure here) several-fold.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from loadgen import HOST, Load, Process, closed_loop, memory_mb, running
from serve_report import render

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("servers", "inprocess", "memory", "soak")
LABELS = {0: "negative", 1: "positive"}
QUICK = {
    "seconds": 2.0,
    "warmup": 1.0,
    "clients": "1,4",
    "rounds": 1,
    "memory_seconds": 2.0,
    "repeats": 5,
    "soak_clients": 8,
    "soak_seconds": 5.0,
    "out": RESULTS / "serve_load_quick.json",
}


def make_adapters(folder: Path, k: int) -> dict[str, Path]:
    """``k`` lorakit adapters a0.. on the embedded MiniLM; lora_B and head random, seed = index."""
    import torch

    from lorakit import apply_lora_to_model, mark_only_lora_as_trainable, save_adapter
    from lorakit.models import load_model, resolve_model

    model = load_model("minilm", LABELS)
    apply_lora_to_model(model, ["query", "key", "value", "dense"], rank=8, alpha=8.0)
    mark_only_lora_as_trainable(model)
    dirs = {}
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or name.startswith("classifier"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        dirs[f"a{i}"] = save_adapter(
            model,
            folder / f"a{i}",
            base_model_name_or_path=resolve_model("minilm"),
            task="sst2",
            extra={"max_length": 128},
        )
    return dirs


def serving(
    args: argparse.Namespace, kind: str, dirs: dict[str, Path], names: list[str]
) -> AbstractContextManager[Process]:
    """``lorakit serve`` (kind "lorakit") or the PEFT peer, serving the adapters ``names``."""
    from lorakit.models import resolve_model

    if kind == "lorakit":
        command = [sys.executable, "-m", "lorakit", "serve", "--model", "minilm"]
    else:
        script = str(ROOT / "benchmarks" / "peft_server.py")
        command = [sys.executable, script, "--model", resolve_model("minilm")]
    command += [a for name in names for a in ("--adapter", f"{name}={dirs[name]}")]
    threads = {} if args.threads is None else {"OMP_NUM_THREADS": str(args.threads)}
    return running([*command, "--host", HOST], {**os.environ, **threads})


def drive(
    proc: Process,
    names: list[str],
    texts: list[str],
    clients: int,
    seconds: float,
    args: argparse.Namespace,
) -> Load:
    """Closed-loop clients on ``proc`` for ``seconds``; request i: text i, adapter i mod K."""

    def body(i: int) -> dict:
        return {"inputs": texts[i % len(texts)], "adapter": names[i % len(names)]}

    return asyncio.run(closed_loop(proc.url, body, clients, seconds, args.timeout, proc.pid))


def probe(url: str, names: list[str], text: str) -> dict[str, float]:
    """p(positive) of one sentence from every adapter: both servers must serve the same."""
    out = {}
    for name in names:
        response = httpx.post(f"{url}/predict", json={"inputs": text, "adapter": name}, timeout=30)
        response.raise_for_status()
        out[name] = next(s["score"] for s in response.json() if s["label"] == "positive")
    return out


def servers(args: argparse.Namespace, dirs: dict[str, Path], texts: list[str]) -> dict:
    """``--rounds`` rounds; in each, every server in turn holds all K adapters, and at every
    client count a K=1 phase (every request names a0) and a K-adapter phase (round-robin)
    follow each other: the pairs compared are measured a minute apart, not ten."""
    phases, probes = [], {}
    names = list(dirs)
    for rnd in range(args.rounds):
        for server in ("lorakit", "peft"):
            with serving(args, server, dirs, names) as proc:
                if rnd == 0:
                    probes[server] = probe(proc.url, names, texts[0])
                for c in args.clients:
                    for k in sorted({1, len(names)}):
                        load = drive(proc, names[:k], texts, c, args.warmup + args.seconds, args)
                        stats = load.stats(args.warmup, args.warmup + args.seconds)
                        phases.append(
                            {"round": rnd, "server": server, "adapters": k, "clients": c, **stats}
                        )
                        phases[-1]["rss_mb"] = memory_mb(proc.pid)["VmRSS"]
                        print(f"  round {rnd} {server} K={k} C={c}: {stats}", flush=True)
    diff = max(abs(probes["lorakit"][n] - probes["peft"][n]) for n in dirs)
    return {"phases": phases, "probe_max_abs_diff": diff, "seconds": args.seconds}


def in_turns(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call, the functions taking turns (rotated) so drift hits all alike."""
    items = list(fns.items())
    for _, fn in items * 2:  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in items[r % len(items) :] + items[: r % len(items)]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def inprocess(args: argparse.Namespace, dirs: dict[str, Path], texts: list[str]) -> dict:
    import torch
    from peft import PeftModel

    from lorakit.models import load_model
    from lorakit.multi import AdapterSet

    # PEFT reads a transformers attribute that is being renamed: noise, not a finding.
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    rows = texts[: args.rows]
    names = [list(dirs)[i % len(dirs)] for i in range(len(rows))]
    adapters = AdapterSet("minilm")
    for name, directory in dirs.items():
        adapters.load(name, directory)
    (first, first_dir), *rest = dirs.items()
    peft = PeftModel.from_pretrained(load_model("minilm", LABELS), first_dir, adapter_name=first)
    for name, directory in rest:
        peft.load_adapter(directory, adapter_name=name)
    peft.eval()
    batch = dict(adapters.tokenizer(rows, padding=True, truncation=True, max_length=128))
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in batch.items()}
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def lorakit_forward() -> np.ndarray:
        return np.stack(adapters.logits(arrays, names))

    def peft_forward() -> np.ndarray:
        with torch.inference_mode():
            return peft(**tensors, adapter_names=names).logits.numpy()

    diff = float(np.abs(lorakit_forward() - peft_forward()).max())
    times = in_turns({"lorakit": lorakit_forward, "peft": peft_forward}, args.repeats)
    rows_, tokens = arrays["input_ids"].shape
    return {
        "rows": rows_,
        "tokens": tokens,
        "adapters": len(dirs),
        "repeats": args.repeats,
        "seconds": times,
        "max_abs_logit_diff": diff,
    }


def memory(args: argparse.Namespace, dirs: dict[str, Path], texts: list[str]) -> dict:
    rows = []
    for k in sorted({1, len(dirs)}):
        names = list(dirs)[:k]
        with serving(args, "lorakit", dirs, names) as proc:
            idle = memory_mb(proc.pid)
            drive(proc, names, texts, max(args.clients), args.memory_seconds, args)
            loaded = memory_mb(proc.pid)
        rss, peak = loaded["VmRSS"], loaded["VmHWM"]
        rows.append({"adapters": k, "idle_mb": idle["VmRSS"], "rss_mb": rss, "peak_mb": peak})
        print(f"  memory K={k}: {rows[-1]}", flush=True)
    return {"rows": rows, "clients": max(args.clients), "seconds": args.memory_seconds}


def soak(args: argparse.Namespace, dirs: dict[str, Path], texts: list[str]) -> dict:
    names = list(dirs)
    with serving(args, "lorakit", dirs, names) as proc:
        load = drive(proc, names, texts, args.soak_clients, args.soak_seconds, args)
    # The RSS once the first `window` requests are answered, and once the last one is.
    window = max(1, min(args.soak_window, len(load.records) // 2))
    first = next((s for s in load.samples if s[1] >= window), load.samples[-1])
    return {
        "clients": args.soak_clients,
        "seconds": args.soak_seconds,
        **load.stats(0, max((end for end, _, _ in load.records), default=args.soak_seconds)),
        "window": window,
        "rss_first_mb": first[2],
        "rss_last_mb": load.samples[-1][2],
        "rss_max_mb": max(s[2] for s in load.samples),
        "rss_samples": [list(s) for s in load.samples],
    }


RUN = {"servers": servers, "inprocess": inprocess, "memory": memory, "soak": soak}


def machine() -> dict[str, Any]:
    from train_throughput import cpu_name

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft")}
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return {
        "cpu": cpu_name(),
        "versions": versions,
        "date": datetime.date.today().isoformat(),
        "commit": git("rev-parse", "--short", "HEAD") + dirty,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated, of " + ", ".join(SECTIONS)
    )
    p.add_argument("--adapters", type=int, default=8, help="K of the mixed runs")
    p.add_argument("--clients", default="1,16,64", help="concurrency levels, comma-separated")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--rounds", type=int, default=3, help="server phases repeated (median)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each measure")
    p.add_argument("--timeout", type=float, default=30.0, help="per request")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads in both servers (OMP_NUM_THREADS); default: torch's",
    )
    p.add_argument("--rows", type=int, default=64, help="in-process batch rows")
    p.add_argument("--repeats", type=int, default=10, help="in-process timings (median)")
    p.add_argument("--memory_seconds", type=float, default=10.0, help="load before reading RSS")
    p.add_argument("--soak_clients", type=int, default=200)
    p.add_argument("--soak_seconds", type=float, default=60.0)
    p.add_argument("--soak_window", type=int, default=10_000, help="requests per RSS window")
    p.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 s phases, clients 1,4")
    if p.parse_known_args()[0].quick:
        p.set_defaults(**QUICK)
    args = p.parse_args()
    args.clients = [int(c) for c in str(args.clients).split(",")]
    args.sections = [s.strip() for s in args.sections.split(",")]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    args = parse_args()
    from lorakit.data import read_file

    validation = read_file(Path(args.data_dir) / "sst2" / "validation.tsv", ["sentence"], "label")
    texts = [t[0] for t in validation.texts]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = machine()
    command = " ".join(["benchmarks/serve_load.py", *map(shlex.quote, sys.argv[1:])])
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(Path(tmp), args.adapters)
        for section in args.sections:
            print(f"{section} ...", flush=True)
            start = time.perf_counter()
            results[section] = RUN[section](args, dirs, texts)
            results[section]["run"] = {
                **results["machine"],
                "command": f".venv/bin/python {command}",
                "quick": args.quick,
                "server_threads": args.threads or "torch default",
                "minutes": round((time.perf_counter() - start) / 60, 2),
            }
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    markdown = render(results)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
