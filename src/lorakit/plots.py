"""Training curves (loss on the left, accuracy on the right, train vs eval vs dev), the
sweep's metric against its first swept axis, and AdaLoRA's rank per layer over training."""

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
        dev = [r for r in evals if f"dev_{key}" in r]
        if dev:
            ax.plot([r["epoch"] for r in dev], [r[f"dev_{key}"] for r in dev], "s--", label="dev")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ranks(
    history: list[tuple[int, list[int]]], layers: list[str], last_step: int, path: Path
) -> None:
    """Write ``adalora_ranks.png``: each layer's rank (rows) from each step it changed at,
    to ``last_step``."""
    import numpy as np

    steps = [step for step, _ in history] + [max(last_step, history[-1][0]) + 1]
    ranks = np.array([r for _, r in history], dtype=float).T  # (layers, changes)
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.14 * len(layers) + 1.5)))
    mesh = ax.pcolormesh(steps, np.arange(len(layers) + 1), ranks, cmap="viridis", shading="flat")
    ax.set_yticks(np.arange(len(layers)) + 0.5, labels=layers, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("optimizer step")
    ax.set_title("AdaLoRA: rank of each layer")
    fig.colorbar(mesh, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(points: list[dict[str, Any]], x: str, series: list[str], path: Path) -> None:
    """``sweep.png``: mean ± std of the dev and validation scores against the axis ``x``, one
    line per combination of the other swept axes (``series``); categories sit side by side.

    Each point carries ``stats``: ``{"dev": (mean, std), "validation": (mean, std)}``, NaN
    means for a set that was not measured (``lorakit.sweep.summarize`` computes them)."""
    import math

    xs = list(dict.fromkeys(str(p["values"].get(x, p["point"])) for p in points))
    numeric = all(_is_number(v) for v in xs)
    if numeric:
        xs.sort(key=float)
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        label = ", ".join(f"{k}={p['values'][k]}" for k in series) or "all"
        groups.setdefault(label, []).append(p)
    metric = points[0]["metric"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, group in groups.items():
        group = sorted(group, key=lambda p: xs.index(str(p["values"].get(x, p["point"]))))
        pos = [xs.index(str(p["values"].get(x, p["point"]))) for p in group]
        where = [float(xs[i]) for i in pos] if numeric else pos
        for key, style in (("dev", "o-"), ("validation", "s--")):
            stats = [p["stats"][key] for p in group]
            if all(math.isnan(m) for m, _ in stats):
                continue
            ax.errorbar(
                where,
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                fmt=style,
                capsize=3,
                label=f"{key}: {label}" if len(groups) > 1 else key,
            )
    if numeric:
        if all(float(v) > 0 for v in xs):
            ax.set_xscale("log", base=2)
        ax.set_xticks([float(v) for v in xs], xs)
    else:
        ax.set_xticks(range(len(xs)), xs, rotation=20, ha="right")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
