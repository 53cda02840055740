"""Out-of-domain accuracy of trained runs: each run's best/ on ../shared/data/reviews/*.tsv.

    .venv/bin/python benchmarks/ood.py sweeps/best/runs/* [--data_dir ../shared/data]

Short Amazon, IMDb and Yelp reviews (1,000 each, labels 0/1 as SST-2's), scored with the
checkpoint each run chose on its dev set; prints one JSON line per run and writes nothing.
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
        print(json.dumps({"run": str(run), **scores}), flush=True)


if __name__ == "__main__":
    main()
