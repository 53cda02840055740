"""``lorakit eval``: flags for an adapter or ONNX graph and its data; prints the metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.commands.flags import add_config_flags, config_overrides

HELP = "evaluate an adapter (or an exported .onnx) on a GLUE split or your own file"
DATA_FLAGS = (
    "task",
    "dataset",
    "data_dir",
    "validation_file",
    "text_columns",
    "label_column",
    "max_length",
    "eval_batch_size",
    "max_eval_samples",
    "precision",
    "device",
    "model",
    "quantize_base",
)
# What these flags mean here, where the training help would mislead.
FLAG_HELP = {
    "model": "base model (default: the adapter's)",
    "task": "GLUE task (default: the adapter's)",
    "max_length": "tokens per example; longer inputs are truncated (default: the adapter's)",
    "max_eval_samples": "evaluate only the first N rows of the split (0 = all)",
    "quantize_base": "base weights as nf4 or int8 (QLoRA; default: as the adapter was trained)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", type=Path, help="adapter directory or Hub id (owner/name)")
    source.add_argument("--onnx", type=Path, metavar="FILE", help="a graph lorakit export wrote")
    parser.add_argument("--split", choices=("validation", "train"), default="validation")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument(
        "--report_dir",
        type=Path,
        help="where report.json, classification_report.txt and confusion_matrix.png go "
        "(default: eval/<adapter>-<split>/ beside the adapter or graph, ./eval_report for a "
        "Hub id; an earlier report there is replaced)",
    )
    add_config_flags(
        parser, DATA_FLAGS, FLAG_HELP, extra_names={"eval_batch_size": ("batch_size",)}
    )


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import LoraKitError
    from lorakit.evaluate import evaluate_adapter, evaluate_onnx
    from lorakit.extras import require_extra
    from lorakit.paths import check_writable

    source = args.onnx or args.adapter
    report_dir = args.report_dir or (
        source.resolve().parent
        / "eval"
        / f"{source.stem if args.onnx else source.name}-{args.split}"
        if source.exists()
        else Path("eval_report")
    )
    check_writable(report_dir, "dir")
    overrides = config_overrides(args)
    if args.onnx:
        require_extra("onnx", "--onnx")
        ignored = {"model_name", "training.precision", "training.device", "quantize_base"} & set(
            overrides
        )
        if ignored:
            flags = ", ".join(f"--{k.split('.')[-1].replace('_name', '')}" for k in sorted(ignored))
            raise LoraKitError(f"{flags} does not apply to --onnx (the graph holds the model)")
        metrics = evaluate_onnx(args.onnx, args.split, overrides)
    else:
        metrics = evaluate_adapter(args.adapter, args.split, overrides)
    from lorakit.classes import format_report
    from lorakit.evaluate import write_report

    paths = write_report(metrics, report_dir)
    if args.json:
        print(json.dumps(metrics))
        return 0
    report = metrics["report"]
    for key, value in metrics.items():
        if key != "report":
            print(f"{key:>10}: {value:.4f}" if isinstance(value, float) else f"{key:>10}: {value}")
    names = [k for k in report if isinstance(report[k], dict) and not k.endswith(" avg")]
    print("\n" + format_report(report, names) + "\n")
    print(f"Report: {', '.join(str(p) for p in paths)}")
    return 0
