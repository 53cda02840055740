"""Batch assembly: the oldest row first, neighbours in length, little padding, a token budget."""

from __future__ import annotations

import asyncio

import numpy as np

from lorakit.batcher import Batcher, Row


def _rows(lengths: list[int]) -> list[Row]:
    loop = asyncio.new_event_loop()
    return [Row("a", np.ones(n, dtype=np.int64), None, loop.create_future(), loop) for n in lengths]


def _batcher(budget: int = 16384) -> Batcher:
    return Batcher(adapters=None, max_batch_tokens=budget)  # type: ignore[arg-type]


def test_short_rows_do_not_pad_to_a_long_one() -> None:
    batcher = _batcher()
    rows = _rows([10, 100, 11, 12, 98, 9])
    batcher.pending = list(rows)
    first = batcher._take()
    assert sorted(len(r.input_ids) for r in first) == [9, 10, 11, 12]
    second = batcher._take()
    assert sorted(len(r.input_ids) for r in second) == [98, 100]
    assert not batcher.pending


def test_the_token_budget_bounds_a_batch_and_the_oldest_goes_first() -> None:
    batcher = _batcher(budget=40)
    rows = _rows([10] * 9)
    batcher.pending = list(rows)
    batch = batcher._take()
    assert len(batch) == 4 and batch[0] is rows[0]
    assert len(batcher.pending) == 5
