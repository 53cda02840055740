"""Per-class work: class-weighted training loss, and lorakit eval's per-class report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model_dir, write_sentiment_rows
from safetensors.torch import load_file

from lorakit.classes import (
    class_weights,
    classification_report,
    confusion_matrix,
    format_report,
    weighted_loss,
)
from lorakit.cli import main
from lorakit.errors import LoraKitError

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_balanced_weights_are_scikit_learns_and_lists_must_fit_the_task() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    want = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert class_weights("balanced", labels, ["a", "b", "c"]) == pytest.approx(list(want))
    assert class_weights("none", labels, ["a", "b", "c"]) is None
    assert class_weights("1,2.5,3", labels, ["a", "b", "c"]) == [1.0, 2.5, 3.0]
    with pytest.raises(LoraKitError, match="2 weights; the task has 3 classes"):
        class_weights("1,2", labels, ["a", "b", "c"])
    with pytest.raises(LoraKitError, match="no training rows of class c"):
        class_weights("balanced", labels[:8], ["a", "b", "c"])


def test_the_weighted_loss_is_the_hand_computed_weighted_mean() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    weights = torch.tensor([0.75, 3.0])
    by_hand, total = 0.0, 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        nll = -(row[y] - math.log(sum(math.exp(v) for v in row)))
        by_hand += weights[y].item() * nll
        total += weights[y].item()
    loss, weight = weighted_loss(logits, labels, weights)
    assert float(loss) == pytest.approx(by_hand / total, rel=1e-6)
    assert float(weight) == pytest.approx(total)
    assert float(loss) != pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    torch.testing.assert_close(loss, torch.nn.CrossEntropyLoss(weight=weights)(logits, labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_report_is_scikit_learns_classification_report(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
    if seed == 2:
        preds[preds == 2] = 0  # a class never predicted: precision 0 by zero_division=0
    names = ["negative", "neutral", "positive"]
    ours = classification_report(preds, labels, names)
    theirs = sklearn_metrics.classification_report(
        labels, preds, labels=[0, 1, 2], target_names=names, output_dict=True, zero_division=0
    )
    for key, value in theirs.items():
        if isinstance(value, dict):
            assert ours[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert ours[key] == pytest.approx(value, abs=1e-12), key
    want = sklearn_metrics.confusion_matrix(labels, preds, labels=[0, 1, 2])
    assert ours["confusion_matrix"] == want.tolist()
    assert (confusion_matrix(preds, labels, 3) == want).all()
    text = format_report(ours, names)
    assert "weighted avg" in text and f"{ours['neutral']['recall']:.4f}" in text


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classes")
    data = root / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 48, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 16, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "data": data}


def _train(env: dict[str, Path], out: Path, *extra: str) -> int:
    return main(
        [
            *["train", "--model", str(env["model"]), "--data_dir", str(env["data"])],
            *["--output_dir", str(out), "--batch_size", "16", "--learning_rate", "1e-2"],
            *["--num_epochs", "1", "--rank", "4", "--alpha", "8", "--precision", "fp32"],
            *["--dropout", "0", "--no-group_by_length", *extra],
        ]
    )


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def test_class_weights_change_training_and_are_recorded(
    env: dict[str, Path], tmp_path: Path
) -> None:
    assert _train(env, tmp_path / "plain") == 0
    assert _train(env, tmp_path / "ones", "--class_weights", "1,1") == 0
    assert _train(env, tmp_path / "weighted", "--class_weights", "1,3") == 0
    plain, ones, weighted = (_tensors(tmp_path / n) for n in ("plain", "ones", "weighted"))
    for k in plain:  # weights of 1 are the plain loss, to the rounding of the sum
        torch.testing.assert_close(ones[k], plain[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(weighted[k], plain[k], atol=1e-4) for k in plain)
    out = tmp_path / "weighted"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_weights"] == {"negative": 1.0, "positive": 3.0}
    meta = json.loads((out / "best" / "lorakit.json").read_text())
    assert meta["class_weights"] == {"negative": 1.0, "positive": 3.0}
    assert (
        "Loss weights per class (1,3): negative 1, positive 3"
        in (out / "training_log.txt").read_text()
    )
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["class_weights"] is None


def test_class_weighted_accumulation_equals_the_larger_batch(
    env: dict[str, Path], tmp_path: Path
) -> None:
    """The step's loss is the weighted mean over all its rows, however they are split."""
    assert _train(env, tmp_path / "big", "--class_weights", "balanced") == 0
    accumulated = ("--class_weights", "balanced", "--gradient_accumulation_steps", "4")
    assert _train(env, tmp_path / "acc", *accumulated, "--batch_size", "4") == 0
    big, acc = _tensors(tmp_path / "big"), _tensors(tmp_path / "acc")
    for k in big:
        torch.testing.assert_close(acc[k], big[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", ["0,1", "heavy", "1,nan"])
def test_bad_class_weights_are_one_line_errors(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    out = tmp_path / "run"
    assert _train(env, out, "--class_weights", bad) != 0
    err = capsys.readouterr().err.strip()
    assert "class_weights" in err and len(err.splitlines()) == 1 and not out.exists()
    assert _train(env, out, "--class_weights", "1,2,3") != 0
    err = capsys.readouterr().err.strip()
    assert "3 weights; the task has 2 classes" in err and len(err.splitlines()) == 1


def test_eval_prints_and_writes_the_per_class_report(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(env, out) == 0
    adapter = ["eval", "--adapter", str(out / "best"), "--data_dir", str(env["data"])]
    capsys.readouterr()
    assert main([*adapter, "--precision", "fp32", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    report = metrics["report"]
    assert report["accuracy"] == pytest.approx(metrics["accuracy"])
    assert sum(report[n]["support"] for n in ("negative", "positive")) == metrics["examples"]
    assert report["positive"]["f1-score"] == pytest.approx(metrics["f1"])
    where = out / "eval" / "best-validation"  # beside the adapter, not inside it
    assert json.loads((where / "report.json").read_text())["report"] == report
    png = (where / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "weighted avg" in (where / "classification_report.txt").read_text()
    assert sorted(p.name for p in (out / "best").iterdir()) == sorted(
        p.name for p in (out / "final").iterdir()
    )  # the adapter directory got nothing new
    mine = tmp_path / "mine"
    assert main([*adapter, "--precision", "fp32", "--report_dir", str(mine)]) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "negative" in printed and str(mine) in printed
    assert (mine / "confusion_matrix.png").exists()
    # A report directory that cannot be one: a one-line error before any work.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*adapter, "--report_dir", str(blocker)]) != 0
    err = capsys.readouterr().err.strip()
    assert "not a directory" in err and len(err.splitlines()) == 1
