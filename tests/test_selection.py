"""Honest model selection (``--dev_split``) and the baselines (``--method head|full``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import interrupt_at, save_tiny_model_dir, write_sentiment_rows
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.data import Examples, hold_out
from lorakit.errors import LoraKitError


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("selection")
    data = root / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 64, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 16, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "data": data}


def _train(env: dict[str, Path], out: Path, *extra: str) -> dict:
    args = [
        "train",
        "--model",
        str(env["model"]),
        "--data_dir",
        str(env["data"]),
        "--output_dir",
        str(out),
        "--batch_size",
        "8",
        "--learning_rate",
        "1e-2",
        "--num_epochs",
        "2",
        "--eval_steps",
        "2",
        "--logging_steps",
        "2",
        "--precision",
        "fp32",
        "--max_length",
        "32",
        *extra,
    ]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def _examples(n: int) -> Examples:
    return Examples([(f"t{i}",) for i in range(n)], [i % 2 for i in range(n)], ("a", "b"), ("s",))


def test_hold_out_is_fixed_disjoint_and_keeps_training_order() -> None:
    data = _examples(100)
    train, dev = hold_out(data, 0.2)
    assert (len(train), len(dev)) == (80, 20)
    assert not {t[0] for t in train.texts} & {t[0] for t in dev.texts}
    assert train.texts == sorted(train.texts, key=lambda t: int(t[0][1:]))  # file order
    torch.manual_seed(123)  # the training seed does not move the dev rows
    assert hold_out(data, 0.2)[1].texts == dev.texts
    assert hold_out(data, 20)[1].texts == dev.texts  # a count or the same fraction
    assert dev.texts != [(f"t{i}",) for i in range(20)]  # drawn, not the first rows
    for bad in (100, 0.999):
        with pytest.raises(LoraKitError, match="leaves no dev or no training rows"):
            hold_out(data, bad)


def test_push_to_hub_is_for_adapters_only() -> None:
    overrides = {"method": "full", "training.push_to_hub": True, "training.hub_model_id": "a/b"}
    with pytest.raises(LoraKitError, match="uploads adapters; method full"):
        load_config(None, overrides)


@pytest.mark.parametrize("value", ["-1", "1.5"])
def test_dev_split_refuses_odd_values(value: str) -> None:
    with pytest.raises(LoraKitError, match="dev_split"):
        load_config(None, {"training.dev_split": float(value)})


def test_dev_split_chooses_best_and_validation_is_only_reported(
    env: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    summary = _train(env, out, "--dev_split", "16", "--rank", "4")
    assert summary["selected_on"] == "dev"
    evals = [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "eval"
    ]
    assert len(evals) > 3 and all("dev_accuracy" in r and "accuracy" in r for r in evals)
    # best/ is the first evaluation with the highest dev score, whatever validation said.
    first_best = max(evals, key=lambda r: (r["dev_accuracy"], -r["step"]))
    assert summary["best_epoch"] == first_best["epoch"]
    assert summary["best_dev"]["accuracy"] == first_best["dev_accuracy"]
    assert summary["best_eval"]["accuracy"] == first_best["accuracy"]
    meta = json.loads((out / "best" / "lorakit.json").read_text())
    assert meta["dev_metrics"]["accuracy"] == first_best["dev_accuracy"]
    log = (out / "training_log.txt").read_text()
    assert "48 train / 16 dev / 16 eval examples" in log
    assert "chosen on the 16 dev rows" in log and "Best model saved! (dev_accuracy" in log


def test_head_only_trains_the_classifier_alone(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "head"
    summary = _train(env, out, "--method", "head")
    base = AutoModelForSequenceClassification.from_pretrained(env["model"])
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith("classifier."))
    assert summary["method"] == "head" and summary["trainable_params"] == head
    saved = load_file(out / "best" / "model.safetensors")
    before = base.state_dict()
    for name, tensor in saved.items():
        if name.startswith("classifier."):
            assert not torch.equal(tensor, before[name]), name
        elif name in before:
            assert torch.equal(tensor, before[name]), name  # the encoder never moved
    assert "Parameter Statistics (head only)" in (out / "training_log.txt").read_text()


def test_full_fine_tuning_writes_a_plain_model_that_lorakit_predicts_with(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "full"
    summary = _train(env, out, "--method", "full")
    base = AutoModelForSequenceClassification.from_pretrained(env["model"])
    assert summary["trainable_params"] == sum(p.numel() for p in base.parameters())
    model = AutoModelForSequenceClassification.from_pretrained(out / "best")  # plain transformers
    moved = base.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, moved)
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out / "best"), "--text", "good fun", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    tokenizer_ids = model.config.id2label
    assert got["label"] in tokenizer_ids.values()
    assert main(["eval", "--adapter", str(out / "best"), "--data_dir", str(env["data"])]) == 0


def test_full_fine_tuning_resumes_to_the_uninterrupted_result(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = ("--method", "full", "--learning_rate", "1e-3", "--dev_split", "16")
    _train(env, whole, *extra)
    with monkeypatch.context() as m:
        interrupt_at(m, 7)  # mid epoch 2 (6 steps per epoch)
        with pytest.raises(AssertionError):
            _train(env, split, *extra)  # exits 130 with a checkpoint
    assert (split / "checkpoint" / "trained.safetensors").is_file()
    assert main(["train", "--resume", "--output_dir", str(split)]) == 0
    a = load_file(whole / "final" / "model.safetensors")
    b = load_file(split / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
