"""Out-of-domain accuracy of trained runs: each run's best/ on ../shared/data/reviews/*.tsv.

    .venv/bin/python benchmarks/ood.py sweeps/best/runs/* [--data_dir ../shared/data]
        [--out benchmarks/results/ood.jsonl]

Short Amazon, IMDb and Yelp reviews (1,000 each, labels 0/1 as SST-2's), scored with the
checkpoint each run chose on its dev set; prints one JSON line per run and, with ``--out``,
keeps them in a JSON-lines file (a run scored again replaces its line), which
``benchmarks/results_table.py`` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train_throughput import ROOT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (holding best/)")
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", type=Path, help="JSON-lines file to keep the scores in")
    args = p.parse_args()
    from lorakit.evaluate import evaluate_adapter

    files = sorted((Path(args.data_dir) / "reviews").glob("*.tsv"))
    for run in args.runs:
        scores = {}
        for f in files:
            overrides = {
                "data.validation_file": str(f),
                "data.text_columns": ["sentence"],
                "training.precision": "fp32",
            }
            scores[f.stem] = evaluate_adapter(run / "best", "validation", overrides)["accuracy"]
        line = {"run": run.as_posix(), **scores}
        print(json.dumps(line), flush=True)
        if args.out:
            keep(args.out, line)


def keep(path: Path, line: dict) -> None:
    """Write ``line`` into the JSON-lines file ``path``, replacing an earlier line of its run."""
    lines = [json.loads(t) for t in path.read_text().splitlines() if t] if path.is_file() else []
    lines = [x for x in lines if x["run"] != line["run"]] + [line]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(path)  # whole or not at all: a killed run leaves the old file


if __name__ == "__main__":
    main()
