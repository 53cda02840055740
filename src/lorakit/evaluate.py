"""Evaluation: loss, accuracy, F1 and Matthews correlation of a model, adapter or ONNX graph,
and for ``lorakit eval`` the per-class report and confusion matrix (``lorakit.classes``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lorakit.batches import run_logits, torch_logits_fn
from lorakit.classes import classification_report
from lorakit.data import Encoded
from lorakit.distributed import World


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy always; F1 of class 1 and Matthews correlation for binary tasks."""
    metrics = {"accuracy": float((preds == labels).mean()) if len(labels) else 0.0}
    if labels.max(initial=0) <= 1 and preds.max(initial=0) <= 1:
        tp = float(((preds == 1) & (labels == 1)).sum())
        fp = float(((preds == 1) & (labels == 0)).sum())
        fn = float(((preds == 0) & (labels == 1)).sum())
        tn = float(((preds == 0) & (labels == 0)).sum())
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        metrics["matthews"] = (tp * tn - fp * fn) / denom if denom else 0.0
    return metrics


def predict_logits(
    model: nn.Module,
    data: Encoded,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Logits (float32, in the original example order) for every example."""
    was_training = model.training
    model.eval()
    try:
        return run_logits(data, torch_logits_fn(model, device, amp_dtype), batch_size)
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    data: Encoded,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """``loss`` plus ``classification_metrics`` of the model on ``data``."""
    return logits_metrics(predict_logits(model, data, batch_size, device, amp_dtype), data.labels)


def evaluate_shared(
    model: nn.Module,
    data: Encoded,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    world: World,
) -> dict[str, float]:
    """``evaluate`` with the rows split over the processes of ``world``; every process gets
    the metrics of the whole set.

    Each process runs every ``world.size``-th row by length (equal work), the logits are summed
    over the processes (each row is non-zero on one process only, so the sum is exact), and
    the metrics come from all the logits: the same as one process, whatever the split.
    """
    if world.size == 1:
        return evaluate(model, data, batch_size, device, amp_dtype)
    rows = np.argsort(-data.lengths, kind="stable")[world.rank :: world.size]
    config: Any = model.config  # a transformers classifier's
    logits = torch.zeros(len(data), config.num_labels)
    if len(rows):
        part = predict_logits(model, data.take(rows), batch_size, device, amp_dtype)
        logits[torch.from_numpy(rows)] = torch.from_numpy(part)
    return logits_metrics(world.sum(logits).numpy(), data.labels)


def logits_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cross-entropy ``loss`` plus ``classification_metrics`` of (n, classes) logits."""
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    return {"loss": float(loss), **classification_metrics(logits.argmax(-1), labels)}


def _task_overrides(meta: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The saved task and max_length, unless the command line gave its own."""
    from lorakit.data import GLUE_TASKS

    if "data.subset" not in overrides and meta.get("task") in GLUE_TASKS:
        overrides = {**overrides, "data.subset": meta["task"]}
    if "training.max_length" not in overrides and meta.get("max_length"):
        overrides = {**overrides, "training.max_length": meta["max_length"]}
    return overrides


def evaluate_adapter(
    adapter_dir: Path, split: Literal["train", "validation"], overrides: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of a saved adapter on a split of its task (or of ``--validation_file``)."""
    from lorakit.config import load_config
    from lorakit.data import encode, load_examples
    from lorakit.hub import resolve_adapter
    from lorakit.models import load_adapted_model, read_saved_config
    from lorakit.runtime import amp_dtype, pick_device, precision_name

    adapter_dir = resolve_adapter(adapter_dir)  # a directory, or a Hub id fetched to the cache
    overrides = _task_overrides(read_saved_config(adapter_dir), overrides)
    config = load_config(None, overrides)
    t = config.training
    device = pick_device(t.device)
    model, tokenizer, adapter_config = load_adapted_model(
        adapter_dir, overrides.get("model_name"), device, overrides.get("quantize_base")
    )
    id2label: dict[int, str] = model.config.id2label  # type: ignore[assignment]
    labels = [id2label[i] for i in sorted(id2label)]
    examples = load_examples(config.data, split, labels).head(t.max_eval_samples)
    data = encode(examples, tokenizer, t.max_length)
    amp = amp_dtype(t.precision, device, "eval")
    logits = predict_logits(model, data, t.eval_batch_size, device, amp)
    quantized = adapter_config.get("quantize_base", "none")
    extra = {"quantize_base": quantized} if quantized != "none" else {}
    return {
        "examples": len(data),
        **logits_metrics(logits, data.labels),
        "precision": precision_name(amp),
        **extra,
        "report": classification_report(logits.argmax(-1), data.labels, labels),
    }


def evaluate_onnx(
    path: Path, split: Literal["train", "validation"], overrides: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of a graph ``lorakit export`` wrote (fp32 or int8), through onnxruntime."""
    import json

    from lorakit.config import load_config
    from lorakit.data import encode, load_examples
    from lorakit.export import onnx_sidecar
    from lorakit.predict import Predictor

    predictor = Predictor.from_onnx(path, overrides.get("training.max_length"))
    meta = json.loads(onnx_sidecar(path).read_text(encoding="utf-8"))
    config = load_config(None, _task_overrides(meta, overrides))
    t = config.training
    examples = load_examples(config.data, split, predictor.labels).head(t.max_eval_samples)
    data = encode(examples, predictor.tokenizer, predictor.max_length)
    logits = run_logits(data, predictor.logits_fn, t.eval_batch_size)
    return {
        "examples": len(data),
        **logits_metrics(logits, data.labels),
        "precision": meta.get("quantization") or "fp32",
        "report": classification_report(logits.argmax(-1), data.labels, predictor.labels),
    }


def write_report(metrics: dict[str, Any], directory: Path) -> list[Path]:
    """``lorakit eval``'s files: report.json (every metric, the per-class report and the
    confusion matrix), classification_report.txt, confusion_matrix.png (labels by name)."""
    import json

    from lorakit.atomic import write_text
    from lorakit.classes import format_report, plot_confusion_matrix

    report = metrics["report"]
    names = [k for k in report if isinstance(report[k], dict) and not k.endswith(" avg")]
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "report.json", directory / "classification_report.txt"]
    write_text(paths[0], json.dumps(metrics, indent=2) + "\n")
    write_text(paths[1], format_report(report, names) + "\n")
    paths.append(plot_confusion_matrix(report, names, directory / "confusion_matrix.png"))
    return paths
