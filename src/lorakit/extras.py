"""Optional dependencies (pip extras), checked before any slow work, naming the fix."""

from __future__ import annotations

import importlib

from lorakit.errors import LoraKitError

# extra -> the modules it installs; mirrors pyproject.toml's [project.optional-dependencies].
EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),  # the mlflow-skinny package's module
    "optuna": ("optuna",),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported (missing or broken installs)."""
    missing = []
    for name in EXTRAS[extra]:
        try:
            importlib.import_module(name)  # the command imports it next anyway
        except ImportError:
            missing.append(name)
    return missing


def require_extra(extra: str, feature: str) -> None:
    """Raise ``LoraKitError`` naming ``pip install 'lorakit[extra]'`` unless ``extra`` is usable.

    Args:
        extra: a key of ``EXTRAS`` ("onnx", "serve").
        feature: what needs it, for the message ("lorakit export", "--onnx").
    """
    missing = missing_modules(extra)
    if missing:
        raise LoraKitError(
            f"{feature} needs {', '.join(missing)} (not installed): pip install 'lorakit[{extra}]'"
        )
