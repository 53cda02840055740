"""Two small probes behind the serving notes in docs/benchmarks-log.md (runs 9-11).

    .venv/bin/python benchmarks/serve_probes.py phases --clients 16 --repeats 1
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/serve_probes.py phases --clients 16
    .venv/bin/python benchmarks/serve_probes.py shapes

phases: one ``lorakit serve`` holding 8 adapters; 12 s closed-loop phases at ``--clients``,
alternating every request on a0 (K=1) and round-robin over a0..a7 (K=8), ``--repeats`` times;
prints requests/s, p95 and the server's cores per phase. The server inherits the environment,
so run it under each OpenMP wait policy to compare them.

shapes: in process, ``AdapterSet.logits`` on 60 batches of 8-16 random validation sentences
(so nearly every batch has a new shape), all rows on a0 against round-robin over 8 adapters,
taken in turns; prints the total seconds of each. Run it under each policy or oneDNN cache
size (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from loadgen import closed_loop
from serve_load import make_adapters, serving

ROOT = Path(__file__).resolve().parent.parent


def phases(args: argparse.Namespace, dirs: dict[str, Path], texts: list[str]) -> None:
    names = list(dirs)
    with serving(argparse.Namespace(threads=None), "lorakit", dirs, names) as proc:
        for rep in range(args.repeats):
            for k in (1, len(names)):

                def body(i: int, k: int = k) -> dict:
                    return {"inputs": texts[i % len(texts)], "adapter": names[i % k]}

                load = asyncio.run(closed_loop(proc.url, body, args.clients, 12, 60, proc.pid))
                s = load.stats(2, 12)
                print(
                    f"{rep} K={k} C={args.clients}: {s['requests_per_sec']} req/s, "
                    f"p95 {s['p95_ms']:.0f} ms, server cores {s['server_cores']}",
                    flush=True,
                )


def shapes(dirs: dict[str, Path], texts: list[str]) -> None:
    from lorakit.multi import AdapterSet

    adapters = AdapterSet("minilm")
    for name, directory in dirs.items():
        adapters.load(name, directory)
    rng = random.Random(0)
    batches = []
    for _ in range(60):
        rows = rng.sample(texts, rng.randint(8, 16))
        encoded = adapters.tokenizer(rows, padding=True, truncation=True, max_length=128)
        batches.append({key: np.asarray(v) for key, v in encoded.items()})
    seconds = {1: 0.0, len(dirs): 0.0}
    for i, batch in enumerate(batches):
        n = len(batch["input_ids"])
        for k in sorted(seconds, reverse=bool(i % 2)):
            start = time.perf_counter()
            adapters.logits(batch, [f"a{j % k}" for j in range(n)])
            seconds[k] += time.perf_counter() - start
    k = len(dirs)
    print(f"K=1 {seconds[1]:.2f} s, K={k} {seconds[k]:.2f} s, ratio {seconds[k] / seconds[1]:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=("phases", "shapes"))
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    from lorakit.data import read_file

    validation = read_file(Path(args.data_dir) / "sst2" / "validation.tsv", ["sentence"], "label")
    texts = [t[0] for t in validation.texts]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(Path(tmp), 8)
        if args.probe == "phases":
            phases(args, dirs, texts)
        else:
            shapes(dirs, texts)


if __name__ == "__main__":
    main()
