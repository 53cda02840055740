"""The layers of docs/architecture.md: imports go downward only, and never in a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lorakit

PACKAGE = Path(lorakit.__file__).parent

# Lowest first. A module may import from its own layer or any layer below, never above.
LAYERS = {
    "foundation": {
        "errors",
        "atomic",
        "paths",
        "extras",
        "runtime",
        "progress",
        "config",
        "distributed",
    },
    "core": {
        "dropout",
        "fused",
        "quant",
        "lora",
        "ia3",
        "adalora",
        "wrapper",
        "mixed",
        "inject",
        "targets",
        "state",
        "adapter",
        "adapter_config",
        "__init__",
    },
    "loading": {
        "data",
        "textfiles",
        "hub",
        "packaged",
        "models",
        "batches",
        "runlog",
        "plots",
        "classes",
    },
    "engines": {
        "export",
        "onnx_int8",
        "predict",
        "predict_files",
        "evaluate",
        "checkpoint",
        "train",
        "loop",
        "budget",
        "doctor",
        "multi",
        "batcher",
        "protocol",
        "serve",
        "runs",
        "sweep",
        "search",
        "tracking",
    },
    "commands": {"cli", "__main__", "commands"},
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def _layer_of(module: str) -> int:
    return RANK[module.split(".")[0]]


def _is_module(name: str) -> bool:
    """``name`` (dotted, inside lorakit) is a module of the package, not, say, lorakit.json."""
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """lorakit modules ``path`` imports anywhere in it: lazy imports inside functions too, and
    modules named by string for ``importlib`` (cli's subcommand table)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value.removeprefix("lorakit.")
            if re.fullmatch(r"lorakit(\.\w+)+", node.value) and _is_module(name):
                found.add(name)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorakit"):
            if node.module == "lorakit":
                found.add("__init__")
            else:
                found.add(node.module.removeprefix("lorakit."))
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("lorakit.") for a in node.names if a.name.startswith("lorakit.")
            }
    return found


def _graph() -> dict[str, set[str]]:
    return {_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in _graph() if m.split(".")[0] not in RANK)
    assert not missing, f"add these modules to LAYERS and docs/architecture.md: {missing}"


def test_imports_only_go_down() -> None:
    upward = [
        f"{module} ({_layer_of(module)}) imports {target} ({_layer_of(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer_of(target) > _layer_of(module)
    ]
    assert not upward, upward


def test_the_core_knows_nothing_of_training_serving_or_the_cli() -> None:
    core = {m: t for m, t in _graph().items() if _layer_of(m) <= RANK["lora"]}
    assert {"lora", "inject", "state", "adapter"} <= set(core)
    for module, targets in core.items():
        assert all(_layer_of(t) <= RANK["lora"] for t in targets), (module, targets)


def test_string_imports_are_followed() -> None:
    """cli imports each subcommand by name; a command importing cli back would be a cycle."""
    assert {f"commands.{c}" for c in ("train", "serve", "sweep")} <= _graph()["cli"]
    assert all("cli" not in targets for m, targets in _graph().items() if m != "__main__")


def test_no_import_cycles() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(
                "import cycle: " + " -> ".join([*path[path.index(module) :], module])
            )
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_without_peft_only_the_tests_that_need_it_skip() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['peft'] = None; import pytest; "
        "sys.exit(pytest.main(['tests/test_adapter.py', '-p', 'no:cacheprovider', "
        "'-p', 'no:warnings', '-k', 'round_trip or refused or broken or layout or misfit']))"
    )
    root = PACKAGE.parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert " passed" in summary and " skipped" in summary, summary


def test_the_public_names_all_resolve() -> None:
    assert sorted(lorakit.__all__) == sorted(lorakit._API)
    for name in lorakit.__all__:
        assert getattr(lorakit, name).__name__ == name
