"""A table of docs/results.md from saved runs: mean ± std over seeds, recipe by recipe.

    .venv/bin/python benchmarks/results_table.py \
        --lorakit "LoRA r=8, lr 1e-3 (shipped)=benchmarks/results/sweeps/full_shipped.csv" \
        --peer "Trainer + PEFT, lr 2e-3=benchmarks/results/peer_full.json" \
        --ood benchmarks/results/ood_full.jsonl

A lorakit row reads a sweep's ``sweep.csv`` as copied to ``benchmarks/results/sweeps/NAME.csv``
(one row per point of its grid); its out-of-domain scores are the ``--ood`` lines
(``benchmarks/ood.py --out``) of ``sweeps/NAME/runs/*``. A peer row reads
``benchmarks/peer_sweep.py``'s JSON (one row per rank and learning rate; out-of-domain scores
are in it). Figures are percent, mean ± sample standard deviation over the seeds found; a column a
run lacks shows "—" and the seeds column says how many runs each row holds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

COLUMNS = ("dev", "validation", "amazon", "imdb", "yelp")


def _labelled(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.rpartition("=")
    if not sep or not label:
        raise SystemExit(f"error: expected LABEL=PATH, got {spec!r}")
    if not Path(path).is_file():
        raise SystemExit(f"error: {path}: no such file")
    return label, Path(path)


def sweep_rows(label: str, path: Path, ood: dict[str, dict]) -> list[dict]:
    """One row per point of a lorakit sweep.csv, its runs' out-of-domain scores joined in."""
    by_point: dict[str, list[dict]] = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            scores = ood.get(f"sweeps/{path.stem}/runs/{r['run']}", {})
            run = {
                "seed": int(r["seed"]),
                "dev": float(r["dev_accuracy"]),
                "validation": float(r["validation_accuracy"]),
                "examples_per_sec": float(r["examples_per_sec"]),
                **{k: scores[k] for k in COLUMNS[2:] if k in scores},
            }
            by_point.setdefault(r["point"], []).append(run)
    return [
        {"label": label if len(by_point) == 1 else f"{label} ({point})", "runs": runs}
        for point, runs in by_point.items()
    ]


def peer_rows(label: str, path: Path) -> list[dict]:
    """One row per rank and learning rate of a benchmarks/peer_sweep.py JSON (rank 8 when a
    run does not say, as peer_sweep.py's default)."""
    groups: dict[tuple[int, float], list[dict]] = {}
    for r in json.loads(path.read_text())["runs"]:
        run = {
            "seed": r["seed"],
            "dev": r["dev_accuracy"],
            "validation": r["validation_accuracy"],
            "examples_per_sec": r["examples_per_sec"],
            **r.get("out_of_domain", {}),
        }
        groups.setdefault((r.get("rank", 8), r["learning_rate"]), []).append(run)
    ranks = {rank for rank, _ in groups}

    def name(rank: int, lr: float) -> str:
        if len(groups) == 1:
            return label
        return f"{label} (r={rank}, lr {lr:g})" if len(ranks) > 1 else f"{label} (lr {lr:g})"

    return [{"label": name(*key), "runs": runs} for key, runs in groups.items()]


def render(rows: list[dict]) -> str:
    from lorakit.sweep import mean_std

    lines = [
        "| run | seeds | " + " | ".join(COLUMNS) + " | examples/s |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        runs = sorted(row["runs"], key=lambda r: r["seed"])
        cells = [mean_std([100 * r[c] for r in runs if c in r]) for c in COLUMNS]
        eps = statistics.mean(r["examples_per_sec"] for r in runs)
        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines.append(f"| {row['label']} | {seeds} | " + " | ".join(cells) + f" | {eps:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lorakit", action="append", default=[], help="LABEL=sweep csv")
    p.add_argument("--peer", action="append", default=[], help="LABEL=peer_sweep json")
    p.add_argument("--ood", type=Path, help="benchmarks/ood.py --out file")
    args = p.parse_args()
    ood: dict[str, dict] = {}
    if args.ood and args.ood.is_file():
        for text in args.ood.read_text().splitlines():
            if text:
                line = json.loads(text)
                ood[line["run"]] = line
    rows = [row for spec in args.lorakit for row in sweep_rows(*_labelled(spec), ood)]
    rows += [row for spec in args.peer for row in peer_rows(*_labelled(spec))]
    if not rows:
        raise SystemExit("error: give at least one --lorakit or --peer")
    print(render(rows))


if __name__ == "__main__":
    main()
