"""benchmarks/results_table.py: sweep rows joined to their out-of-domain scores, mean ± std."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "results_table", ROOT / "benchmarks" / "results_table.py"
)
assert _spec is not None and _spec.loader is not None
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)

HEADER = "run,point,seed,examples_per_sec,dev_accuracy,validation_accuracy\n"


def test_sweep_rows_join_their_own_out_of_domain_scores(tmp_path: Path) -> None:
    csv_path = tmp_path / "full_x.csv"
    csv_path.write_text(
        HEADER + '"base,seed=0",base,0,100,0.90,0.80\n"base,seed=1",base,1,120,0.92,0.84\n'
    )
    ood = {
        "sweeps/full_x/runs/base,seed=0": {"amazon": 0.9, "imdb": 0.8, "yelp": 0.7},
        "sweeps/full_x/runs/base,seed=1": {"amazon": 0.8, "imdb": 0.8, "yelp": 0.7},
        "sweeps/other/runs/base,seed=0": {"amazon": 0.1, "imdb": 0.1, "yelp": 0.1},
    }
    rows = table.sweep_rows("LoRA", csv_path, ood)
    assert [r["label"] for r in rows] == ["LoRA"]
    line = table.render(rows).splitlines()[-1]
    # 84 and 80 validation: mean 82, sample std 2.83; amazon 90 and 80: 85 ± 7.07
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == [
        "LoRA", "0, 1", "91.00 ± 1.41", "82.00 ± 2.83", "85.00 ± 7.07", "80.00 ± 0.00",
        "70.00 ± 0.00", "110.0",
    ]  # fmt: skip


def test_peer_rows_split_by_learning_rate_and_missing_scores_show_a_dash(tmp_path: Path) -> None:
    runs = [
        {
            "learning_rate": 1e-3,
            "seed": 0,
            "dev_accuracy": 0.8,
            "validation_accuracy": 0.7,
            "examples_per_sec": 50.0,
            "out_of_domain": {"amazon": 0.6},
        },
        {
            "learning_rate": 2e-3,
            "seed": 0,
            "dev_accuracy": 0.9,
            "validation_accuracy": 0.85,
            "examples_per_sec": 60.0,
        },
    ]
    path = tmp_path / "peer.json"
    path.write_text(json.dumps({"runs": runs}))
    lines = table.render(table.peer_rows("peer", path)).splitlines()[2:]
    assert lines == [
        "| peer (lr 0.001) | 0 | 80.00 | 70.00 | 60.00 | — | — | 50.0 |",
        "| peer (lr 0.002) | 0 | 90.00 | 85.00 | — | — | — | 60.0 |",
    ]
    # Runs at another rank (peer_sweep.py --rank) are their own row, never averaged in.
    runs.append({**runs[0], "rank": 32, "seed": 1, "dev_accuracy": 0.5})
    path.write_text(json.dumps({"runs": runs}))
    labels = [row["label"] for row in table.peer_rows("peer", path)]
    assert labels == ["peer (r=8, lr 0.001)", "peer (r=8, lr 0.002)", "peer (r=32, lr 0.001)"]


def test_a_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "results_table.py"),
            "--lorakit",
            f"x={tmp_path / 'none.csv'}",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert out.stderr.strip().endswith("none.csv: no such file")


def test_ood_keep_replaces_the_line_of_a_run_scored_again(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ood", ROOT / "benchmarks" / "ood.py")
    assert spec is not None and spec.loader is not None
    ood = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ood)
    path = tmp_path / "ood.jsonl"
    ood.keep(path, {"run": "a", "imdb": 0.5})
    ood.keep(path, {"run": "b", "imdb": 0.6})
    ood.keep(path, {"run": "a", "imdb": 0.7})
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert lines == [{"run": "b", "imdb": 0.6}, {"run": "a", "imdb": 0.7}]
    assert not path.with_suffix(".tmp").exists()
