"""lorakit eval."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.cli import add_config_flags, config_overrides

HELP = "evaluate an adapter on a GLUE split or your own file"
DATA_FLAGS = (
    "task",
    "dataset",
    "data_dir",
    "validation_file",
    "text_columns",
    "label_column",
    "max_length",
    "batch_size",
    "max_eval_samples",
    "precision",
    "device",
    "model",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", type=Path, required=True, help="adapter directory")
    parser.add_argument("--split", choices=("validation", "train"), default="validation")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_config_flags(parser, only=DATA_FLAGS)


def run(args: argparse.Namespace) -> int:
    from lorakit.evaluate import evaluate_adapter

    metrics = evaluate_adapter(args.adapter, args.split, config_overrides(args))
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>10}: {value:.4f}" if isinstance(value, float) else f"{key:>10}: {value}")
    return 0
