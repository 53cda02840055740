"""Per-class work: loss weights for imbalanced training data, and the per-class report.

``class_weights`` turns ``--class_weights`` into one weight per class. The report gives what
scikit-learn's ``classification_report`` gives (precision, recall, F1 and support per class,
accuracy, macro and weighted averages; 0 where a ratio has no denominator, its
``zero_division=0``) plus the confusion matrix, and draws the matrix with the labels' names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lorakit.errors import LoraKitError


def class_weights(spec: str, labels: np.ndarray, label_names: Sequence[str]) -> list[float] | None:
    """The loss weight of each class, or None for ``none``.

    ``balanced`` is scikit-learn's ``compute_class_weight("balanced")``: ``n_rows /
    (n_classes * rows_of_class)``, counted on ``labels`` (the rows the run trains on), so a
    class with half the rows weighs twice as much. A list gives one weight per class, in the
    order of ``label_names``.
    """
    k = len(label_names)
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(labels, minlength=k)
        missing = [label_names[i] for i in range(k) if counts[i] == 0]
        if missing:
            raise LoraKitError(
                f"--class_weights balanced: no training rows of class {', '.join(missing)}"
            )
        return [float(len(labels) / (k * c)) for c in counts]
    weights = [float(w) for w in spec.split(",")]
    if len(weights) != k:
        raise LoraKitError(
            f"--class_weights has {len(weights)} weights; the task has {k} classes "
            f"({', '.join(label_names)})"
        )
    return weights


def weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CrossEntropyLoss(weight=weights)``: ``Σ w_y·loss / Σ w_y`` over the rows, in fp32,
    and the rows' ``Σ w_y`` (a training step's share of its global batch is its weight)."""
    row_w = weights[labels]
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    total = row_w.sum()
    return (row_w * per_row).sum() / total.clamp_min(1e-12), total


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts: row = true class, column = predicted class."""
    return np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def classification_report(
    preds: np.ndarray, labels: np.ndarray, label_names: Sequence[str]
) -> dict[str, Any]:
    """Per class (by name) and averaged: ``precision``, ``recall``, ``f1-score``, ``support``,
    keyed as ``classification_report(..., output_dict=True)`` keys them, plus ``accuracy``
    and ``confusion_matrix`` (a list of rows, true class by row)."""
    k = len(label_names)
    matrix = confusion_matrix(preds, labels, k)
    tp = np.diag(matrix).astype(float)
    support = matrix.sum(1).astype(float)  # true rows of each class
    predicted = matrix.sum(0).astype(float)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)  # = 2PR / (P + R), 0 when both are
    report: dict[str, Any] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1-score": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }
    n = float(support.sum())
    report["accuracy"] = float(tp.sum() / n) if n else 0.0
    averages = {"macro avg": np.full(k, 1 / k), "weighted avg": _ratio(support, np.full(k, n))}
    for avg, w in averages.items():
        report[avg] = {
            "precision": float(w @ precision),
            "recall": float(w @ recall),
            "f1-score": float(w @ f1),
            "support": int(n),
        }
    report["confusion_matrix"] = matrix.tolist()
    return report


def format_report(report: dict[str, Any], label_names: Sequence[str]) -> str:
    """The report as a text table, laid out as scikit-learn prints it."""
    width = max(len(n) for n in [*label_names, "weighted avg"])
    head = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"
    lines = [head, ""]

    def row(name: str, r: dict[str, Any]) -> str:
        return (
            f"{name:>{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} "
            f"{r['f1-score']:>9.4f} {r['support']:>9}"
        )

    lines += [row(name, report[name]) for name in label_names]
    support = report["macro avg"]["support"]
    lines += ["", f"{'accuracy':>{width}} {'':>9} {'':>9} {report['accuracy']:>9.4f} {support:>9}"]
    lines += [row(avg, report[avg]) for avg in ("macro avg", "weighted avg")]
    return "\n".join(lines)


def plot_confusion_matrix(report: dict[str, Any], label_names: Sequence[str], path: Path) -> Path:
    """The confusion matrix as a PNG: counts in each cell, true class by row, names on both
    axes, each row shaded by its share of the class's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(report["confusion_matrix"])
    k = len(label_names)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.7 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    slanted = k > 3 or max(len(n) for n in label_names) > 12
    ax.set_xticks(
        range(k), label_names, rotation=30 if slanted else 0, ha="right" if slanted else "center"
    )
    ax.set_yticks(range(k), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{matrix[i, j]:,}", ha="center", va="center", color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class's rows")
    ax.set_title(f"confusion matrix (accuracy {report['accuracy']:.4f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
