"""Base models: only the task head may be new; anything else missing is an error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model_dir
from safetensors.torch import load_file, save_file

from lorakit import LoraKitError
from lorakit.models import load_model


def test_a_complete_checkpoint_loads_with_a_fresh_head_of_other_classes(tmp_path: Path) -> None:
    path = save_tiny_model_dir(tmp_path / "m", num_labels=2)
    model = load_model(str(path), {0: "a", 1: "b", 2: "c"})
    assert model.classifier.weight.shape == (3, 32)
    saved = load_file(str(path / "model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(dict(model.named_parameters())[key], saved[key])


def test_a_checkpoint_missing_an_encoder_weight_is_refused(tmp_path: Path) -> None:
    path = save_tiny_model_dir(tmp_path / "m")
    weights = load_file(str(path / "model.safetensors"))
    del weights["bert.encoder.layer.1.output.dense.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoraKitError, match=r"incomplete.*layer\.1\.output\.dense\.weight"):
        load_model(str(path), {0: "a", 1: "b"})
