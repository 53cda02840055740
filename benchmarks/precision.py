"""fp32 against bf16 autocast for the inference jobs, on one adapter: accuracy and speed.

    .venv/bin/python benchmarks/precision.py --adapter runs/shipped/best [--data_dir ../shared/data]

For each precision: accuracy and loss (``lorakit eval``'s path) on the 872 SST-2 validation
sentences and the three review sets, sentences/s of merged prediction over the SST-2 sentences
(``lorakit predict``'s path: length-sorted batches of 32, best of ``--passes``), and rows/s of
the server's forward (``AdapterSet.logits``, unmerged LoRA as ``lorakit serve`` runs it, batches
of 32 rows). The two precisions take turns pass by pass, so a slow minute of the machine hits
both. The record (machine, CPU flags, date, commit) goes to ``--out`` and the table to stdout.
Where the CPU lacks native bf16 (no ``amx_bf16``/``avx512_bf16``) bf16 is emulated, tens of
times slower: its accuracy is what bf16 gives anywhere, its speed only what this CPU gives.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from run import machine
from train_throughput import ROOT

PRECISIONS = ("fp32", "bf16")


def accuracy(adapter: Path, data_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    from lorakit.evaluate import evaluate_adapter

    sets = {"sst2": data_dir / "sst2" / "validation.tsv"}
    sets |= {f.stem: f for f in sorted((data_dir / "reviews").glob("*.tsv"))}
    out: dict[str, dict[str, dict[str, float]]] = {p: {} for p in PRECISIONS}
    for name, path in sets.items():
        for precision in PRECISIONS:
            overrides = {
                "data.validation_file": str(path),
                "data.text_columns": ["sentence"],
                "training.precision": precision,
            }
            m = evaluate_adapter(adapter, "validation", overrides)
            out[precision][name] = {"accuracy": m["accuracy"], "loss": m["loss"]}
            print(f"{precision} {name}: {m['accuracy']:.4f}", flush=True)
    return out


def speeds(adapter: Path, data_dir: Path, passes: int) -> dict[str, dict[str, float]]:
    from lorakit.multi import AdapterSet
    from lorakit.predict import Predictor
    from lorakit.textfiles import read_texts

    texts = [t[0] for t in read_texts(data_dir / "sst2" / "validation.tsv", ("sentence",)).texts]
    predictors = {p: Predictor.from_adapter(adapter, precision=p) for p in PRECISIONS}
    served = {}
    for p in PRECISIONS:
        s = AdapterSet(
            json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"],
            precision=p,
        )
        s.load("a", adapter)
        served[p] = s
    tok = served["fp32"].tokenizer
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for i in range(0, len(order), 32):
        enc = tok(
            [texts[j] for j in order[i : i + 32]],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="np",
        )
        batches.append({k: v.astype(np.int64) for k, v in enc.items()})
    best: dict[str, dict[str, float]] = {p: {"predict": 0.0, "serve": 0.0} for p in PRECISIONS}
    labels: dict[str, list[str]] = {}
    for _ in range(passes):
        for p in PRECISIONS:
            start = time.perf_counter()
            labels[p] = [r["label"] for r in predictors[p].predict(texts)]
            best[p]["predict"] = max(best[p]["predict"], len(texts) / (time.perf_counter() - start))
            start = time.perf_counter()
            for b in batches:
                served[p].logits(b, ["a"] * len(b["input_ids"]))
            best[p]["serve"] = max(best[p]["serve"], len(texts) / (time.perf_counter() - start))
            print(f"{p}: {best[p]}", flush=True)
    flips = sum(a != b for a, b in zip(labels["fp32"], labels["bf16"], strict=True))
    best["bf16"]["sst2_label_flips"] = flips  # sentences whose label bf16 changes
    return best


def table(record: dict) -> str:
    acc, speed = record["accuracy"], record["speed"]
    sets = list(acc["fp32"])
    head = "| precision | " + " | ".join(sets) + " | predict sentences/s | serve rows/s |"
    rows = [head, "|---" * (len(sets) + 3) + "|"]
    for p in PRECISIONS:
        cells = [f"{100 * acc[p][s]['accuracy']:.2f}" for s in sets]
        rows.append(
            f"| {p} | "
            + " | ".join(cells)
            + f" | {speed[p]['predict']:.1f} | {speed[p]['serve']:.1f} |"
        )
    delta = [100 * (acc["bf16"][s]["accuracy"] - acc["fp32"][s]["accuracy"]) for s in sets]
    rows.append(
        "| bf16 - fp32 (points) | "
        + " | ".join(f"{d:+.2f}" for d in delta)
        + " | "
        + f"{speed['bf16']['predict'] / speed['fp32']['predict']:.2f}x | "
        + f"{speed['bf16']['serve'] / speed['fp32']['serve']:.2f}x |"
    )
    flips = speed["bf16"].get("sst2_label_flips")
    rows.append(f"\nSST-2 validation sentences whose predicted label bf16 changes: {flips}")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, required=True, help="an adapter directory (best/)")
    p.add_argument("--data_dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--passes", type=int, default=3, help="timed passes per precision (best)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision.json")
    args = p.parse_args()
    started = time.time()
    record = {
        "command": "benchmarks/precision.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "machine": machine(),
        "accuracy": accuracy(args.adapter, args.data_dir),
        "speed": speeds(args.adapter, args.data_dir, args.passes),
    }
    record["minutes"] = round((time.time() - started) / 60, 1)
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    runs.append(record)
    args.out.write_text(json.dumps(runs, indent=2) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
