"""Runtime choices: precision names and the autocast dtypes they mean."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import LoraKitError
from lorakit.runtime import amp_dtype


def test_precision_names_map_to_autocast_dtypes() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype("fp32", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    assert amp_dtype("fp16", cpu) is torch.float16
    with pytest.raises(LoraKitError, match="precision must be"):
        amp_dtype("fp8", cpu)
