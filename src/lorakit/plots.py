"""Training curves: loss on the left, accuracy on the right, train vs eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Write ``training_curves.png`` from metrics.jsonl records (x axis: epochs)."""
    train = [r for r in history if r["kind"] == "train"]
    evals = [r for r in history if r["kind"] == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((ax_loss, "loss", "Loss"), (ax_acc, "accuracy", "Accuracy")):
        ax.plot([r["epoch"] for r in train], [r[key] for r in train], label="train", alpha=0.8)
        ax.plot([r["epoch"] for r in evals], [r[key] for r in evals], "o-", label="eval")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
