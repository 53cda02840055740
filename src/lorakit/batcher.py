"""Dynamic batching for the server: requests enqueue rows, one worker thread scores batches.

The async request handlers only enqueue tokenized rows, each with a future. One worker thread
takes the oldest waiting row and fills a batch with the rows closest to it in length (least
padding), up to ``max_batch_tokens`` padded tokens, whatever their adapters; runs
``AdapterSet.logits`` once for the batch; and resolves the futures on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lorakit.multi import AdapterSet
from lorakit.runtime import release_free_memory, thread_governor

logger = logging.getLogger(__name__)
TRIM_EVERY = 64  # batches between returns of free heap pages to the system
MIN_FILL = 0.75  # least share of real (not padding) tokens in a batch of more than one row


@dataclass
class Row:
    """One text (or pair) waiting to be scored."""

    adapter: str
    input_ids: np.ndarray
    token_type_ids: np.ndarray | None
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.perf_counter)

    def resolve(self, logits: np.ndarray | None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():  # the client went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(logits)  # type: ignore[arg-type]

        self.loop.call_soon_threadsafe(settle)


BatchObserver = Callable[[int, int, float], None]  # rows, padded tokens, seconds


class Batcher:
    """A queue of rows and the worker thread that scores them in batches."""

    def __init__(
        self,
        adapters: AdapterSet,
        max_batch_tokens: int,
        max_batch_requests: int | None = None,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.adapters = adapters
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.on_batch = on_batch
        self.pending: list[Row] = []
        self.ready = threading.Condition()
        self.stopping = False
        self.governor = thread_governor()
        self.thread = threading.Thread(target=self._work, name="lorakit-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Score what is queued, then end the worker."""
        with self.ready:
            self.stopping = True
            self.ready.notify()
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def queue_size(self) -> int:
        return len(self.pending)

    def submit(self, rows: list[Row]) -> None:
        with self.ready:
            self.pending.extend(rows)
            self.ready.notify()

    def _take(self) -> list[Row]:
        """The oldest row and its nearest neighbours in length, within the token budget.

        A row joins only while the batch stays at least ``MIN_FILL`` real tokens (the rest is
        padding): a long row does not make a batch of short ones pad to its length, it waits
        for the next batch (of rows near its own length) instead.
        """
        oldest = self.pending[0]
        by_length = sorted(
            self.pending, key=lambda r: abs(len(r.input_ids) - len(oldest.input_ids))
        )
        batch: list[Row] = []
        width = tokens = 0
        for row in by_length:
            n = len(row.input_ids)
            new_width = max(width, n)
            padded = new_width * (len(batch) + 1)
            if batch and (
                padded > self.max_batch_tokens
                or (tokens + n) < MIN_FILL * padded
                or (self.max_batch_requests and len(batch) >= self.max_batch_requests)
            ):
                break
            batch.append(row)
            width, tokens = new_width, tokens + n
        taken = {id(r) for r in batch}
        self.pending = [r for r in self.pending if id(r) not in taken]
        return batch

    def _work(self) -> None:
        batches = 0
        while True:
            with self.ready:
                while not self.pending and not self.stopping:
                    self.ready.wait()
                if not self.pending:  # stopping, and nothing left to score
                    return
                batch = self._take()
            self.governor.poll()  # in this thread: torch's thread count is per thread
            self._run(batch)
            batches += 1
            if batches % TRIM_EVERY == 0:
                release_free_memory()  # ~1 ms; keeps a long-running server's RSS flat

    def _run(self, batch: list[Row]) -> None:
        start = time.perf_counter()
        try:
            inputs = pad_rows(batch, int(self.adapters.tokenizer.pad_token_id or 0))
            logits = self.adapters.logits(inputs, [r.adapter for r in batch])
        except Exception as e:  # noqa: BLE001 - a model error fails this batch, not the server
            logger.exception("batch of %d rows failed", len(batch))
            for row in batch:
                row.resolve(None, e)
            return
        for row, out in zip(batch, logits, strict=True):
            row.resolve(out)
        if self.on_batch is not None:
            rows, width = inputs["input_ids"].shape
            self.on_batch(rows, rows * width, time.perf_counter() - start)


def pad_rows(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """The model's inputs for ``rows``, padded on the right to the longest: input_ids,
    attention_mask, and token_type_ids when any row has them (zeros for those without)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    with_types = any(r.token_type_ids is not None for r in rows)
    types = torch.zeros((len(rows), width), dtype=torch.int64) if with_types else None
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.from_numpy(r.input_ids)
        mask[i, :n] = 1
        if types is not None and r.token_type_ids is not None:
            types[i, :n] = torch.from_numpy(r.token_type_ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        inputs["token_type_ids"] = types
    return inputs
