"""Running a classifier over encoded texts in length-sorted batches.

The one path that evaluation, prediction and export share: texts tokenized once by
``lorakit.data.encode_texts`` are cut into length-sorted batches (least padding), padded by
``collate`` and handed as numpy arrays to a backend that returns logits (torch here,
onnxruntime in ``lorakit.export``); ``run_logits`` puts the logits back in input order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lorakit.data import Encoded, collate, eval_order
from lorakit.runtime import autocast, thread_governor

LogitsFn = Callable[[dict[str, np.ndarray]], np.ndarray]  # int64 (batch, seq) -> (batch, labels)


def run_logits(
    data: Encoded,
    logits_fn: LogitsFn,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(n, labels) float32 logits of every example, in the original order."""
    out: np.ndarray | None = None
    governor = thread_governor()
    for idx in eval_order(data.lengths, batch_size):
        governor.poll()
        batch = collate(data, idx)
        del batch["labels"]
        logits = logits_fn({k: v.numpy() for k, v in batch.items()})
        if out is None:
            out = np.zeros((len(data), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
        if on_batch is not None:
            on_batch(len(idx))
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def torch_logits_fn(model: nn.Module, device: torch.device, amp: torch.dtype | None) -> LogitsFn:
    """A backend running ``model`` (in eval mode) on ``device``, autocast to ``amp`` unless None."""

    @torch.inference_mode()
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
        with autocast(device, amp):
            return model(**inputs).logits.float().cpu().numpy()

    return run
