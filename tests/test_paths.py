"""Bad output paths are one line on stderr, found before any model is loaded."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

import lorakit.commands.doctor
import lorakit.models
import lorakit.train
from lorakit import LoraKitError
from lorakit.cli import main

LOADED = "reached model loading"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")


@pytest.fixture(autouse=True)
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model is the slow work a path check must come before: stop there."""

    def stop(*args: object, **kwargs: object) -> None:
        raise LoraKitError(LOADED)

    monkeypatch.setattr(lorakit.train, "load_tokenizer", stop)
    monkeypatch.setattr(lorakit.models, "load_adapted_model", stop)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 1, argv
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lorakit {argv[0]}: error: ") and message in err, (argv, err)


@pytest.fixture()
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


@linux_only
def test_train_output_dir(tmp_path: Path, a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = ["train", "--model", "minilm", "--data_dir", str(tmp_path), "--output_dir"]
    _one_line_error(capsys, [*train, str(a_file)], f"{a_file} is a file, not a directory")
    _one_line_error(capsys, [*train, str(a_file / "run")], f"{a_file} is a file")
    _one_line_error(capsys, [*train, str(a_file / "a" / "run")], f"{a_file} is a file")
    # Root ignores permission bits, but not /proc: a real read-only place, and one that
    # refuses a new directory.
    _one_line_error(capsys, [*train, "/proc/self/lorakit-run"], "/proc/self is not writable")
    _one_line_error(capsys, [*train, "/proc/lorakit/run"], "cannot create /proc/lorakit")
    deep = tmp_path / "new" / "deeper" / "run"
    _one_line_error(capsys, [*train, str(deep)], LOADED)  # a good path gets as far as loading
    assert deep.parent.is_dir()


@linux_only
def test_merge_export_predict_out(
    tmp_path: Path, a_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = ["--adapter", str(tmp_path / "adapter")]
    texts = tmp_path / "texts.txt"
    texts.write_text("good\n")
    cases = {
        "merge": (["merge", *adapter, "--out"], ""),
        "export": (["export", *adapter, "--out"], ".onnx"),
        "predict": (["predict", *adapter, "--file", str(texts), "--out"], ".jsonl"),
    }
    for argv, suffix in cases.values():
        _one_line_error(capsys, [*argv, f"{a_file}/out{suffix}"], f"{a_file} is a file")
        _one_line_error(capsys, [*argv, f"/proc/self/out{suffix}"], "/proc/self is not writable")
        _one_line_error(capsys, [*argv, f"/proc/lorakit/out{suffix}"], "cannot create /proc")
        deep = tmp_path / argv[0] / "deeper" / f"out{suffix}"
        _one_line_error(capsys, [*argv, str(deep)], LOADED)
        assert deep.parent.is_dir()
    _one_line_error(capsys, [*cases["merge"][0], str(a_file)], "is a file")
    (tmp_path / "dir.onnx").mkdir()
    _one_line_error(capsys, [*cases["export"][0], str(tmp_path / "dir.onnx")], "is a directory")
    _one_line_error(capsys, [*cases["predict"][0], str(tmp_path)], "is a directory")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "/x/y: Permission denied"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/x"), "/x: Is a directory"),
        (FileExistsError(errno.EEXIST, "File exists", "/a", None, "/b"), "/a -> /b: File exists"),
    ],
)
def test_cli_turns_path_os_errors_into_one_line(
    error: OSError,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(lorakit.commands.doctor, "run", fail)
    _one_line_error(capsys, ["doctor"], message)


def test_cli_keeps_tracebacks_for_other_os_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(args: object) -> int:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(lorakit.commands.doctor, "run", fail)
    with pytest.raises(ConnectionResetError):
        main(["doctor"])
