"""Every precision path on every machine: bf16 autocast runs on any CPU (emulated where the
hardware lacks it, so only tiny models here), and each job's bf16 result stays within a stated
tolerance of its fp32 result and keeps its labels. ``LORAKIT_FAST_BF16`` forces the decision
``--precision auto`` takes, so both kinds of machine are tested on either."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_sentiment_rows
from tiny_adapter import make_adapter, make_base

from lorakit.cli import main
from lorakit.errors import LoraKitError
from lorakit.predict import Predictor
from lorakit.runtime import AUTO_BF16_JOBS, FAST_BF16_ENV, amp_dtype, precision_name

# bf16 keeps 8 bits of mantissa (~3 significant digits); over the tiny model's two layers the
# probabilities of one row move by up to ~1e-2. Labels are compared where fp32 is more than
# this far from a tie, as only there is a label a fact rather than a coin toss.
PROB_TOL = 2e-2
TEXTS = ["the movie was good", "not a great film", "fine", "bad bad bad movie, not fine at all"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    base = make_base(root / "base")
    return {"root": root, "base": base, "adapter": make_adapter(root / "adapter", base)}


@pytest.mark.parametrize(("forced", "fast"), [("1", True), ("0", False)])
def test_the_switch_forces_the_auto_decision(
    monkeypatch: pytest.MonkeyPatch, forced: str, fast: bool
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv(FAST_BF16_ENV, forced)
    for job in ("train", "eval", "predict", "serve"):
        want = torch.bfloat16 if fast and job in AUTO_BF16_JOBS else None
        assert amp_dtype("auto", cpu, job) is want, job
    assert amp_dtype("auto", cpu, "export") is None  # export's graph is fp32 either way
    assert amp_dtype("fp32", cpu, "train") is None and amp_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setenv(FAST_BF16_ENV, "yes")
    with pytest.raises(LoraKitError, match="LORAKIT_FAST_BF16 must be 1 or 0"):
        amp_dtype("auto", cpu)


def test_without_the_switch_the_cpu_flags_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit import runtime

    monkeypatch.delenv(FAST_BF16_ENV, raising=False)
    for flags, fast in ((frozenset({"avx2", "fma"}), False), (frozenset({"amx_bf16"}), True)):
        monkeypatch.setattr(runtime, "_cpu_flags", lambda f=flags: f)
        assert runtime.cpu_has_fast_bf16() is fast
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == [
        "fp32",
        "bf16",
        "fp16",
    ]


def _probs(predictions: list) -> np.ndarray:  # noqa: ANN001
    return np.array([[p["probs"][k] for k in sorted(p["probs"])] for p in predictions])


def _labels_agree_off_ties(low: np.ndarray, exact: np.ndarray) -> None:
    clear = np.abs(exact.max(1) - np.sort(exact, 1)[:, -2]) > 2 * PROB_TOL
    assert (low.argmax(1) == exact.argmax(1))[clear].all()


@pytest.mark.parametrize("merge", [True, False])
def test_predict_bf16_stays_near_fp32(env: dict[str, Path], merge: bool) -> None:
    exact = Predictor.from_adapter(env["adapter"], merge=merge, precision="fp32")
    low = Predictor.from_adapter(env["adapter"], merge=merge, precision="bf16")
    assert "bfloat16" in low.description and "bfloat16" not in exact.description
    a, b = _probs(low.predict(TEXTS)), _probs(exact.predict(TEXTS))
    assert np.abs(a - b).max() < PROB_TOL
    assert np.abs(a - b).max() > 0  # bf16 really ran: it rounds
    _labels_agree_off_ties(a, b)


def test_auto_follows_the_switch_in_predict_and_eval(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_sentiment_rows(env["root"] / "eval.tsv", 24, seed=3)
    flags = ["--validation_file", str(data), "--text_columns", "sentence", "--json"]
    flags += ["--label_column", "label", "--adapter", str(env["adapter"])]
    results = {}
    for forced in ("1", "0"):
        monkeypatch.setenv(FAST_BF16_ENV, forced)
        capsys.readouterr()
        assert main(["eval", *flags]) == 0
        results[forced] = json.loads(capsys.readouterr().out)
        args = ["predict", "--adapter", str(env["adapter"]), "--text", TEXTS[0], "--json"]
        assert main(args) == 0
        results[forced]["probs"] = json.loads(capsys.readouterr().out)["probs"]
    fast, slow = results["1"], results["0"]
    assert (fast["precision"], slow["precision"]) == ("bf16", "fp32")
    assert fast["loss"] == pytest.approx(slow["loss"], abs=PROB_TOL)
    assert abs(fast["accuracy"] - slow["accuracy"]) <= 2 / 24  # at most two near-ties flip
    for label, p in slow["probs"].items():
        assert fast["probs"][label] == pytest.approx(p, abs=PROB_TOL)


def test_export_checks_against_fp32_even_where_bf16_is_fast(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv(FAST_BF16_ENV, "1")
    out = env["root"] / "onnx" / "model.onnx"
    assert main(["export", "--adapter", str(env["adapter"]), "--out", str(out)]) == 0
    capsys.readouterr()
    exact = _probs(Predictor.from_adapter(env["adapter"], precision="fp32").predict(TEXTS))
    graph = _probs(Predictor.from_onnx(out).predict(TEXTS))
    np.testing.assert_allclose(graph, exact, atol=1e-5)


def test_serve_bf16_stays_near_fp32_and_mixed_rows_match_single(env: dict[str, Path]) -> None:
    from lorakit.multi import AdapterSet

    sets = {p: AdapterSet(str(env["base"]), precision=p) for p in ("fp32", "bf16")}
    for s in sets.values():
        s.load("a", env["adapter"])
        s.load("b", make_adapter(env["root"] / "b", env["base"], seed=7))
    tokens = sets["fp32"].tokenizer(TEXTS, padding=True, return_tensors="np")
    batch = {k: v.astype(np.int64) for k, v in tokens.items()}
    names = ["a", "b", "b", "a"]
    mixed = {p: np.stack(s.logits(batch, names)) for p, s in sets.items()}
    assert sets["bf16"].amp is torch.bfloat16 and sets["fp32"].amp is None
    assert np.abs(mixed["bf16"] - mixed["fp32"]).max() < 5e-2  # logits, not probabilities
    for precision, s in sets.items():
        for name in ("a", "b"):
            alone = np.stack(s.logits(batch, [name] * len(TEXTS)))
            rows = [i for i, n in enumerate(names) if n == name]
            tol = 1e-5 if precision == "fp32" else 5e-2
            np.testing.assert_allclose(mixed[precision][rows], alone[rows], atol=tol)


def test_train_bf16_stays_near_fp32(tmp_path: Path) -> None:
    from conftest import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")
    data = write_sentiment_rows(tmp_path / "train.tsv", 64)
    summaries = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        argv = ["train", "--model", str(model), "--dataset", "csv", "--train_file", str(data)]
        argv += ["--validation_file", str(data), "--text_columns", "sentence"]
        argv += ["--label_column", "label", "--output_dir", str(out), "--num_epochs", "2"]
        argv += ["--batch_size", "16", "--learning_rate", "1e-2", "--precision", precision]
        argv += ["--max_length", "16", "--logging_steps", "1"]
        assert main(argv) == 0
        summaries[precision] = json.loads((out / "summary.json").read_text())
        assert summaries[precision]["precision"] == precision
        assert f"precision {precision}" in (out / "training_log.txt").read_text()
    low, exact = summaries["bf16"], summaries["fp32"]
    assert low["final_eval"]["loss"] == pytest.approx(exact["final_eval"]["loss"], abs=5e-2)
    assert abs(low["final_eval"]["accuracy"] - exact["final_eval"]["accuracy"]) <= 2 / 64
