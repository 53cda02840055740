"""A missing optional dependency is one line naming the pip command, before any slow work."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import lorakit.models
from lorakit import LoraKitError
from lorakit.cli import main

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FIX = "pip install 'lorakit[onnx]'"
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")


def test_extras_match_pyproject() -> None:
    from lorakit.extras import EXTRAS

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    # Distributions whose module is named otherwise; psycopg is the PostgreSQL driver, imported
    # only for a postgresql:// --storage (SQLite studies need no driver), so not checked first.
    module_of = {"mlflow-skinny": "mlflow", "psycopg": None}
    for extra, modules in EXTRAS.items():
        packages = {re.split(r"[<>=!~;\[ ]", spec)[0].lower() for spec in declared[extra]}
        wanted = {module_of.get(p, p) for p in packages} - {None}
        assert wanted == set(modules), extra


@pytest.mark.parametrize("module", ONNX_MODULES)
@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--adapter", "adapter", "--out", "model.onnx"],
        ["eval", "--onnx", "model.onnx"],
        ["predict", "--onnx", "model.onnx", "--text", "fine"],
    ],
    ids=["export", "eval", "predict"],
)
def test_onnx_commands_name_the_extra(
    argv: list[str],
    module: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the extra was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lorakit.models, "load_adapted_model", loaded)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(argv) == 1
    feature = "lorakit export" if argv[0] == "export" else "--onnx"
    err = capsys.readouterr().err
    found = re.fullmatch(
        rf"lorakit {argv[0]}: error: {feature} needs (.+) \(not installed\): (.+)\n", err
    )
    assert found and module in found[1].split(", ") and found[2] == FIX, err


def test_serve_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.extras import require_extra

    require_extra("serve", "lorakit serve")  # installed here: no error
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(LoraKitError, match=r"needs uvicorn .*pip install 'lorakit\[serve\]'$"):
        require_extra("serve", "lorakit serve")
