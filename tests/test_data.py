"""Data: file formats, label maps, clear errors with line numbers, length-grouped batches."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lorakit.config import DataSettings
from lorakit.data import GLUE_TASKS, batch_order, eval_order, load_examples, read_file
from lorakit.errors import LoraKitError
from lorakit.models import resolve_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_csv_tsv_jsonl_read_alike(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,label\n"fine, really",pos\nbad,neg\n')
    (tmp_path / "a.tsv").write_text('text\tlabel\n"fine, really"\tpos\nbad\tneg\n')
    (tmp_path / "a.jsonl").write_text(
        '{"text": "\\"fine, really\\"", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n'
    )
    csv = read_file(tmp_path / "a.csv", ["text"], "label")
    assert csv.texts == [("fine, really",), ("bad",)] and csv.labels == [1, 0]
    assert csv.label_names == ("neg", "pos")
    tsv = read_file(tmp_path / "a.tsv", ["text"], "label")  # GLUE style: quotes are text
    assert tsv.texts[0] == ('"fine, really"',)
    assert read_file(tmp_path / "a.jsonl", ["text"], "label").texts == tsv.texts


def test_sentence_pairs_and_given_label_names(tmp_path: Path) -> None:
    (tmp_path / "p.tsv").write_text("s1\ts2\ty\na\tb\tyes\nc\td\tno\n")
    ex = read_file(tmp_path / "p.tsv", ["s1", "s2"], "y", label_names=["no", "yes"])
    assert ex.texts == [("a", "b"), ("c", "d")] and ex.labels == [1, 0]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.csv", "", "holds no rows"),
        ("h.csv", "text,label\n", "holds no rows"),
        ("m.csv", "text,stars\nfine,1\n", r"m.csv:2: column 'label' is missing"),
        ("j.jsonl", '{"text": "a", "label": 0}\n[1]\n', r"j.jsonl:2: not a JSON object"),
        ("x.xlsx", "whatever", "unsupported file type"),
    ],
)
def test_bad_files_name_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(LoraKitError, match=message):
        read_file(tmp_path / name, ["text"], "label")


def test_unknown_label_and_bad_encoding(tmp_path: Path) -> None:
    (tmp_path / "v.csv").write_text("text,label\na,pos\nb,meh\n")
    with pytest.raises(LoraKitError, match=r"v.csv:3: unknown label 'meh'"):
        read_file(tmp_path / "v.csv", ["text"], "label", label_names=["neg", "pos"])
    (tmp_path / "b.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(LoraKitError, match="not UTF-8"):
        read_file(tmp_path / "b.csv", ["text"], "label")
    with pytest.raises(LoraKitError, match="does not exist"):
        read_file(tmp_path / "nope.csv", ["text"], "label")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not beside the project")
@pytest.mark.parametrize(("task", "rows"), [("sst2", 872), ("mrpc", 408)])
def test_real_glue_files_from_data_dir(task: str, rows: int) -> None:
    ex = load_examples(DataSettings(subset=task, data_dir=str(SHARED)), "validation")
    assert len(ex) == rows and ex.text_columns == GLUE_TASKS[task].text_columns
    assert set(ex.labels) == {0, 1} and ex.label_names == GLUE_TASKS[task].labels


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.tsv").write_text(
        "sentence1\tsentence2\tlabel\na\tb\tnot_entailment\n"
    )
    monkeypatch.setenv("LORAKIT_DATA_DIR", str(tmp_path))
    ex = load_examples(DataSettings(subset="rte"), "train")
    assert ex.labels == [1] and ex.texts == [("a", "b")]
    with pytest.raises(LoraKitError, match="validation.tsv does not exist"):
        load_examples(DataSettings(subset="rte"), "validation")
    with pytest.raises(LoraKitError, match="unknown GLUE task 'sst3'"):
        load_examples(DataSettings(subset="sst3"), "train")


def test_glue_tasks_declare_metrics() -> None:
    assert GLUE_TASKS["mrpc"].metric == GLUE_TASKS["qqp"].metric == "f1"
    assert GLUE_TASKS["cola"].metric == "matthews"
    assert GLUE_TASKS["mnli"].validation_split == "validation_matched"
    assert len(GLUE_TASKS["mnli"].labels) == 3


def test_batches_cover_every_example_once_and_group_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=1000)
    grouped = batch_order(lengths, 16, seed=1, epoch=0, group_by_length=True)
    plain = batch_order(lengths, 16, seed=1, epoch=0, group_by_length=False)
    for batches in (grouped, plain):
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(1000))

    def padding(bs: list[np.ndarray]) -> int:
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in bs)

    assert padding(grouped) < padding(plain) / 4
    again = batch_order(lengths, 16, seed=1, epoch=0, group_by_length=True)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again, strict=True))
    other_epoch = batch_order(lengths, 16, seed=1, epoch=1, group_by_length=True)
    assert not all(np.array_equal(a, b) for a, b in zip(grouped, other_epoch, strict=True))
    ordered = eval_order(lengths, 100)
    assert [len(b) for b in ordered] == [100] * 10
    assert lengths[ordered[0]].min() >= lengths[ordered[1]].max()


def test_hub_model_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraKitError, match="minilm"):
        resolve_model("someone/not-cached-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(LoraKitError, match="unreachable.*minilm"):
        resolve_model("someone/not-cached-model")
    assert time.perf_counter() - start < 10
    with pytest.raises(LoraKitError, match="does not exist"):
        resolve_model("./no/such/dir")
    assert Path(resolve_model("minilm"), "config.json").is_file()
