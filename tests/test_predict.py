"""`lorakit predict`: every mode, pair tasks, files with bad rows, and every bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_adapter import make_adapter, make_base

from lorakit.cli import main
from lorakit.predict import DEMO_SENTENCES, Predictor

LONG = "the movie was not good at all, and the plot was even worse than that"  # > 32 tokens


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    base = make_base(root / "base")
    return {
        "base": base,
        "adapter": make_adapter(root / "adapter", base),
        "pair": make_adapter(root / "pair", base, task="mrpc"),
        "other_base": make_base(root / "base48", hidden=48),
    }


@pytest.fixture(scope="module")
def predictor(env: dict[str, Path]) -> Predictor:
    return Predictor.from_adapter(env["adapter"], batch_size=2, precision="fp32")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def test_predictor_batches_keep_order_and_merge_changes_nothing(
    env: dict[str, Path], predictor: Predictor
) -> None:
    texts = ["fine", LONG, "great film", "bad", "the movie"]
    batched = predictor.predict(texts)  # length-sorted batches of 2
    one_by_one = [predictor.predict([t])[0] for t in texts]
    unmerged = Predictor.from_adapter(env["adapter"], merge=False, precision="fp32").predict(texts)
    for a, b, c in zip(batched, one_by_one, unmerged, strict=True):
        assert a["label"] == b["label"] == c["label"]
        assert list(a["probs"]) == ["negative", "positive"]
        assert sum(a["probs"].values()) == pytest.approx(1.0)
        assert a["score"] == max(a["probs"].values())
        for name, p in a["probs"].items():
            assert p == pytest.approx(b["probs"][name], abs=1e-5)
            assert p == pytest.approx(c["probs"][name], abs=1e-5)
    assert [p["truncated"] for p in batched] == [False, True, False, False, False]
    assert len({round(p["score"], 4) for p in batched}) > 1  # a real model, not a constant


def test_text_mode_json_and_human(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--adapter", str(env["adapter"]), "--text", "great", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["text"] == "great" and record["label"] in ("negative", "positive")
    assert set(record["probs"]) == {"negative", "positive"} and record["truncated"] is False
    code, out, _ = _run(capsys, "--adapter", str(env["adapter"]), "--mode", "text", "--text", "x")
    assert code == 0 and "confident" in out and "█" in out
    assert "negative" in out and "positive" in out


def test_text_mode_unmerged_matches_merged(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--adapter", str(env["adapter"]), "--text", "the film", "--json", "--precision", "fp32")
    merged = json.loads(_run(capsys, *args)[1])
    unmerged = json.loads(_run(capsys, *args, "--no-merge")[1])
    assert merged["label"] == unmerged["label"]
    assert merged["score"] == pytest.approx(unmerged["score"], abs=1e-5)


def test_long_text_is_truncated_with_a_note(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "--adapter", str(env["adapter"]), "--text", LONG, "--json")
    assert code == 0 and json.loads(out)["truncated"] is True
    assert "longer than 32 tokens" in err
    code, out, _ = _run(capsys, "--adapter", str(env["adapter"]), "--text", LONG)
    assert code == 0 and "note: longer than 32 tokens" in out


@pytest.mark.parametrize("text", ["", "   \t "])
def test_empty_text_is_a_clear_error(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], text: str
) -> None:
    code, out, err = _run(
        capsys, "--adapter", str(env["adapter"]), "--mode", "text", "--text", text
    )
    assert code == 1 and out == ""
    assert err.strip() == "lorakit predict: error: the text is empty: there is nothing to classify"


def test_demo_mode_shows_a_table(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = _run(capsys, "--adapter", str(env["adapter"]), "--mode", "demo")
    assert code == 0 and len(DEMO_SENTENCES) >= 10
    for sentence in DEMO_SENTENCES:
        assert sentence in out
    assert "probabilities" in out and "negative 0." in out and "positive 0." in out


def test_interactive_via_stdin(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _stdin(monkeypatch, f"great film\n\n   \n{LONG}\n:q\nnever read\n")
    code, out, err = _run(capsys, "--adapter", str(env["adapter"]))
    assert code == 0
    assert out.count("confident") == 2  # two sentences labelled
    assert out.count("empty input skipped") == 2
    assert "note: longer than 32 tokens" in out
    assert "never read" not in out and out.rstrip().endswith("bye")


def test_interactive_leaves_on_ctrl_d_and_ctrl_c(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _stdin(monkeypatch, "bad\n")  # then end of input: Ctrl-D
    code, out, _ = _run(capsys, "--adapter", str(env["adapter"]), "--mode", "interactive")
    assert code == 0 and "confident" in out and out.rstrip().endswith("bye")

    def ctrl_c(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", ctrl_c)
    code, out, err = _run(capsys, "--adapter", str(env["adapter"]), "--mode", "interactive")
    assert code == 0 and out.rstrip().endswith("bye") and "interrupted" not in err


def test_interactive_in_a_real_process(env: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "lorakit", "predict", "--adapter", str(env["adapter"])]
    done = subprocess.run(cmd, input="great film\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "great film" in done.stdout and "confident" in done.stdout
    assert "Traceback" not in done.stderr


def test_pair_task_text_and_interactive(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = str(env["pair"])
    code, _, err = _run(capsys, "--adapter", pair, "--text", "a b")
    assert code == 1 and "pass --text_pair" in err
    code, out, _ = _run(capsys, "--adapter", pair, "--text", "a", "--text_pair", "b", "--json")
    record = json.loads(out)
    assert code == 0 and record["text_pair"] == "b"
    assert set(record["probs"]) == {"not_equivalent", "equivalent"}
    code, _, err = _run(capsys, "--adapter", str(env["adapter"]), "--text", "a", "--text_pair", "b")
    assert code == 1 and "single texts" in err
    _stdin(monkeypatch, "one sentence\nanother one\n:q\n")
    code, out, _ = _run(capsys, "--adapter", pair)
    assert code == 0 and "sentence 2>" in out and out.count("confident") == 1


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("in.txt", "great film\n\nbad movie\nfine\n"),
        ("in.tsv", "sentence\tlabel\ngreat film\t1\nbad movie\t0\nfine\t1\n"),
        ("in.csv", 'id,text\n1,great film\n2,"bad movie"\n3,fine\n'),
        (
            "in.jsonl",
            '{"sentence": "great film"}\n{"sentence": "bad movie"}\n{"sentence": "fine"}\n',
        ),
    ],
)
def test_file_mode_each_format(
    env: dict[str, Path],
    predictor: Predictor,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    content: str,
) -> None:
    path = _write(tmp_path / name, content)
    out = tmp_path / "preds.jsonl"
    code, stdout, err = _run(
        capsys,
        "--adapter",
        str(env["adapter"]),
        "--file",
        str(path),
        "--out",
        str(out),
        "--precision",
        "fp32",
    )
    assert code == 0 and err == "" and "3 labelled" in stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == ["great film", "bad movie", "fine"]
    expected = predictor.predict(["great film", "bad movie", "fine"])
    assert [r["label"] for r in records] == [p["label"] for p in expected]
    assert records[0]["probs"]["positive"] == pytest.approx(
        expected[0]["probs"]["positive"], abs=1e-5
    )


def test_file_with_bad_rows_reports_lines_and_predicts_the_rest(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tsv = _write(
        tmp_path / "bad.tsv",
        b"sentence\tlabel\n"
        b"good one\t1\n"  # 2
        b"caf\xe9 latte\t1\n"  # 3: latin-1, not UTF-8
        b"no label column\n"  # 4: too few fields
        b"   \t0\n" + LONG.encode() + b"\t0\n"  # 5: empty text  # 6: truncated
        b"last\t1\n",  # 7
    )
    out = tmp_path / "preds.jsonl"
    code, stdout, err = _run(
        capsys, "--adapter", str(env["adapter"]), "--file", str(tsv), "--out", str(out)
    )
    assert code == 0
    assert f"{tsv}:3: not UTF-8" in err
    assert f"{tsv}:4: has 1 fields, the header has 2" in err
    assert f"{tsv}:5: column 'sentence' is empty" in err
    assert "1 row(s) longer than 32 tokens were truncated (lines 6)" in err
    assert "3 labelled" in stdout and "3 row(s) skipped" in stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [2, 6, 7]
    assert [r["truncated"] for r in records] == [False, True, False]


def test_jsonl_bad_rows_and_stdout_output(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _write(
        tmp_path / "in.jsonl",
        b'{"sentence": "good"}\n'  # 1
        b"{not json\n"  # 2
        b"[1, 2]\n"  # 3
        b'{"text": "no sentence key"}\n'  # 4
        b'{"sentence": 5}\n'  # 5
        b'{"sentence": "\xff\xfe"}\n'  # 6
        b"\n"
        b'{"sentence": "bad"}\n',  # 8
    )
    code, stdout, err = _run(capsys, "--adapter", str(env["adapter"]), "--file", str(path))
    assert code == 0
    for n, what in [
        (2, "not valid JSON"),
        (3, "not a JSON object"),
        (4, "column 'sentence' is missing"),
        (5, "column 'sentence' is not a string"),
        (6, "not UTF-8"),
    ]:
        assert f"{path}:{n}: {what}" in err
    assert [json.loads(line)["line"] for line in stdout.splitlines()] == [1, 8]
    assert "2 labelled" in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("in.tsv", "review\tlabel\nok\t1\n", "no column 'sentence'"),
        ("in.xlsx", "x", "unsupported file type"),
        ("in.txt", "\n  \n", "no row could be labelled"),
    ],
)
def test_unusable_files_are_errors(
    env: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    content: str,
    message: str,
) -> None:
    path = _write(tmp_path / name, content)
    code, _, err = _run(capsys, "--adapter", str(env["adapter"]), "--file", str(path))
    assert code == 1 and message in err and "Traceback" not in err
    code, _, err = _run(
        capsys, "--adapter", str(env["adapter"]), "--file", str(tmp_path / "no.txt")
    )
    assert code == 1 and "does not exist" in err


def _corrupt(tmp_path: Path, adapter: Path, name: str, data: bytes) -> Path:
    copy = tmp_path / "corrupt"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / name).write_bytes(data)
    return copy


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("bad_json", "is not valid JSON"),
        ("bad_weights", "not a readable safetensors file"),
        ("other_base", "was this adapter trained on another base model?"),
        ("missing_base", "does not exist"),
    ],
)
def test_bad_adapters_are_one_line_errors(
    env: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    case: str,
    message: str,
) -> None:
    adapter, extra = env["adapter"], []
    if case == "missing":
        adapter = tmp_path / "nope"
    elif case == "bad_json":
        adapter = _corrupt(tmp_path, adapter, "adapter_config.json", b"{oops")
    elif case == "bad_weights":
        adapter = _corrupt(tmp_path, adapter, "adapter_model.safetensors", b"\x00" * 64)
    elif case == "other_base":
        extra = ["--model", str(env["other_base"])]
    else:
        extra = ["--model", str(tmp_path / "gone")]
    code, out, err = _run(capsys, "--adapter", str(adapter), "--text", "hi", *extra)
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("lorakit predict: error:")
    assert message in lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "text"], "--mode text needs --text"),
        (["--mode", "file"], "--mode file needs --file"),
        (["--text", "a", "--out", "x.jsonl"], "--out is for --file"),
        (["--mode", "demo", "--text", "a"], "--text goes with --mode text"),
        (["--text", "a", "--max_length", "500"], "exceeds the model's 64 positions"),
        (["--text", "a", "--batch_size", "0"], "--batch_size must be positive"),
    ],
)
def test_flag_misuse_is_an_error(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = _run(capsys, "--adapter", str(env["adapter"]), *argv)
    assert code == 1 and message in err
