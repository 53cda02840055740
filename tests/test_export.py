"""`lorakit merge` and `lorakit export`: parity with unmerged LoRA, safe writes, ONNX predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_adapter import make_adapter, make_base
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lorakit.export
from lorakit import LoraKitError
from lorakit.cli import main
from lorakit.inject import lora_layers
from lorakit.models import load_adapted_model
from lorakit.wrapper import LinearWithLoRA

TEXTS = ["fine", "the movie was not good", "great film, really great", "bad"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = make_base(root / "base")
    return {"root": root, "adapter": make_adapter(root / "adapter", base)}


@pytest.fixture(scope="module")
def onnx_file(env: dict[str, Path]) -> Path:
    out = env["root"] / "onnx" / "model.onnx"
    assert main(["export", "--adapter", str(env["adapter"]), "--out", str(out)]) == 0
    return out


def _inputs(tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))  # (4, seq), padded


def _unmerged_logits(adapter: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    model, _, _ = load_adapted_model(adapter)
    assert any(True for _ in lora_layers(model))
    with torch.no_grad():
        return model(**inputs).logits.numpy()


def test_merged_directory_loads_in_plain_transformers_with_equal_logits(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(env["adapter"]), "--out", str(out)]) == 0
    assert "largest logit difference" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    assert model.config.id2label == {0: "negative", 1: "positive"}
    inputs = _inputs(out)
    with torch.no_grad():
        merged = model(**inputs).logits.numpy()
    np.testing.assert_allclose(merged, _unmerged_logits(env["adapter"], inputs), atol=1e-4)


def test_merge_never_replaces_a_good_output_on_failure(
    env: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "merged"
    args = ["merge", "--adapter", str(env["adapter"]), "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(args) == 1
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    # A failed check (here: forced by a zero tolerance) leaves the old output and no temp dirs.
    monkeypatch.setattr(lorakit.export, "TOLERANCE", 0.0)
    assert main([*args, "--overwrite"]) == 1
    assert "differs from the unmerged model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    monkeypatch.undo()
    assert main([*args, "--overwrite"]) == 0
    assert (
        main(["merge", "--adapter", str(tmp_path / "nope"), "--out", str(out), "--overwrite"]) == 1
    )
    assert "does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "file").write_text("x")
    assert main(["merge", "--adapter", str(env["adapter"]), "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in capsys.readouterr().err


def test_onnx_graph_has_dynamic_axes_and_matches_torch(
    env: dict[str, Path], onnx_file: Path
) -> None:
    meta = json.loads(onnx_file.with_suffix(".json").read_text())
    assert meta["id2label"] == {"0": "negative", "1": "positive"}
    assert meta["max_length"] == 32 and meta["text_columns"] == ["sentence"]
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for node in session.get_inputs():
        assert [isinstance(d, str) for d in node.shape] == [True, True], node.shape
    inputs = _inputs(onnx_file.with_suffix(".tokenizer"))
    expected = _unmerged_logits(env["adapter"], inputs)
    for rows in (slice(0, 1), slice(0, 4)):  # batch 1 and batch 4 (padded), neither traced
        feed = {k: v[rows].numpy() for k, v in inputs.items()}
        np.testing.assert_allclose(session.run(None, feed)[0], expected[rows], atol=1e-4)


def test_predict_on_onnx_matches_the_adapter(
    env: dict[str, Path], onnx_file: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    capsys.readouterr()
    for text in TEXTS:
        assert main(["predict", "--onnx", str(onnx_file), "--text", text, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        argv = ["predict", "--adapter", str(env["adapter"]), "--text", text, "--json"]
        assert main([*argv, "--precision", "fp32"]) == 0
        want = json.loads(capsys.readouterr().out)
        assert got["label"] == want["label"]
        assert got["probs"]["positive"] == pytest.approx(want["probs"]["positive"], abs=1e-4)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    assert main(["predict", "--onnx", str(onnx_file), "--file", str(path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(TEXTS)


def test_export_refusals_and_broken_onnx(
    env: dict[str, Path], onnx_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = str(env["adapter"])
    capsys.readouterr()
    cases = [
        (["export", "--adapter", adapter, "--out", str(onnx_file)], "pass --overwrite"),
        (["export", "--adapter", adapter, "--out", str(tmp_path / "m.bin")], "must end in .onnx"),
        (["export", "--adapter", str(tmp_path / "x"), "--out", str(tmp_path / "m.onnx")], "exist"),
        (["predict", "--onnx", str(tmp_path / "none.onnx"), "--text", "a"], "does not exist"),
        (["predict", "--onnx", str(onnx_file), "--text", "a", "--no-merge"], "does not apply"),
    ]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    cases.append((["predict", "--onnx", str(broken), "--text", "a"], "not a loadable ONNX"))
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(onnx_file.read_bytes())  # the graph without its json and tokenizer
    cases.append((["predict", "--onnx", str(lonely), "--text", "a"], "lonely.json"))
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "m.onnx").exists()


def test_parity_check_rejects_large_differences_and_nan() -> None:
    a = np.zeros((2, 2), dtype=np.float32)
    assert lorakit.export._check_close("graph", a + 5e-5, a) == pytest.approx(5e-5)
    for bad in (a + 2e-4, a * np.nan):
        with pytest.raises(LoraKitError, match="graph differs from the unmerged model"):
            lorakit.export._check_close("graph", bad, a)


def _eval_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, float]:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_on_onnx_equals_the_adapter_and_int8_stays_close(
    env: dict[str, Path], onnx_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import write_sentiment_rows

    data = write_sentiment_rows(env["root"] / "eval.tsv", 40, seed=3)
    flags = ["--validation_file", str(data), "--text_columns", "sentence"]
    flags += ["--label_column", "label"]
    want = _eval_json(capsys, ["--adapter", str(env["adapter"]), "--precision", "fp32", *flags])
    got = _eval_json(capsys, ["--onnx", str(onnx_file), *flags])
    assert got["examples"] == want["examples"] == 40
    assert got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)

    int8 = env["root"] / "onnx" / "model.int8.onnx"
    argv = ["export", "--adapter", str(env["adapter"]), "--out", str(int8), "--quantize", "int8"]
    assert main(argv) == 0
    assert "labels agree on" in capsys.readouterr().out
    assert json.loads(int8.with_suffix(".json").read_text())["quantization"] == "int8"
    assert int8.stat().st_size < onnx_file.stat().st_size
    inputs = {k: v.numpy() for k, v in _inputs(onnx_file.with_suffix(".tokenizer")).items()}
    fp32 = ort.InferenceSession(str(onnx_file)).run(None, inputs)[0]
    quant = ort.InferenceSession(str(int8)).run(None, inputs)[0]
    # int8 weights are not exact; on this 32-wide random model the error is ~10% of the logits.
    assert 0 < np.abs(quant - fp32).max() < 0.15 * np.abs(fp32).max()
    low = _eval_json(capsys, ["--onnx", str(int8), *flags])
    assert low["loss"] == pytest.approx(want["loss"], rel=0.1)

    capsys.readouterr()
    assert main(["eval", "--onnx", str(onnx_file), "--model", "x", *flags]) == 1
    assert "--model does not apply to --onnx" in capsys.readouterr().err
    for bad in (
        ["eval", "--onnx", str(onnx_file), "--adapter", "x"],
        ["export", *argv[1:5], "--quantize", "int4", "--overwrite"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_int8_keeps_the_most_sensitive_matmuls_fp32(
    env: dict[str, Path], onnx_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx
    from conftest import write_sentiment_rows

    from lorakit.onnx_int8 import matmuls, quantize_int8, sensitivity

    calibration = write_sentiment_rows(env["root"] / "calib.tsv", 24, seed=5)
    inputs = {k: v.numpy() for k, v in _inputs(onnx_file.with_suffix(".tokenizer")).items()}
    feeds = [inputs]
    nodes = matmuls(onnx_file)
    assert len(nodes) >= 4
    scores = sensitivity(onnx_file, feeds)
    assert set(scores) == set(nodes) and all(s > 0 for s in scores.values())
    ranked = sorted(scores, key=lambda n: -scores[n])

    out = env["root"] / "q" / "keep.onnx"
    out.parent.mkdir(exist_ok=True)
    errors = {}
    for keep in (0, 2, len(nodes)):
        info = quantize_int8(onnx_file, out, feeds, keep_fp32=keep)
        assert info["int8_fp32_nodes"] == ranked[:keep]
        graph = onnx.load(str(out))
        # still float matmuls (onnxruntime renames a Gemm it splits "<name>_MatMul")
        plain = {
            n.name.removesuffix("_MatMul")
            for n in graph.graph.node
            if n.op_type in ("MatMul", "Gemm")
        }
        assert set(ranked[:keep]) <= plain
        assert all(n not in plain for n in ranked[keep:])  # the rest became int8 ops
        errors[keep] = info["int8_logit_error"]
    assert errors[len(nodes)] == 0.0 < errors[2] <= errors[0]

    # Through the CLI, with a calibration file: the sidecar names what stayed fp32.
    int8 = env["root"] / "q" / "cli.onnx"
    argv = ["export", "--adapter", str(env["adapter"]), "--out", str(int8), "--quantize", "int8"]
    assert main([*argv, "--calibration", str(calibration), "--int8_keep_fp32", "1"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"sensitivity {len(nodes)}/{len(nodes)}" in printed and "1 matmul(s) kept fp32" in printed
    )
    meta = json.loads(int8.with_suffix(".json").read_text())
    assert len(meta["int8_fp32_nodes"]) == 1 and meta["int8_fp32_nodes"][0] in nodes

    for bad, message in (
        (["--calibration", str(env["root"] / "missing.tsv")], "no such file"),
        (["--int8_keep_fp32", "-1"], "must be >= 0"),
    ):
        assert main([*argv, "--overwrite", *bad]) == 1
        assert message in capsys.readouterr().err
    assert main([*argv[:5], "--overwrite", "--calibration", str(calibration)]) == 1
    assert "only applies with --quantize int8" in capsys.readouterr().err
