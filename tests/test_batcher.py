"""The server's batch path: rows padded straight into the model's tensors, tokenizing on a
thread of its own, never on the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_adapter import make_adapter, make_base

from lorakit.batcher import Row, pad_rows
from lorakit.data import Encoded, collate


def _row(ids: list[int], types: list[int] | None) -> Row:
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
    finally:
        loop.close()
    t = None if types is None else np.asarray(types, dtype=np.int64)
    return Row("a", np.asarray(ids, dtype=np.int64), t, future, loop)


def test_pad_rows_equals_the_training_collate() -> None:
    rows = [_row([2, 7, 3], [0, 0, 0]), _row([2, 9, 8, 5, 3], None), _row([2, 3], [0, 1])]
    got = pad_rows(rows, pad_id=0)
    data = Encoded(
        input_ids=[r.input_ids for r in rows],
        token_type_ids=[
            r.token_type_ids if r.token_type_ids is not None else np.zeros_like(r.input_ids)
            for r in rows
        ],
        labels=np.zeros(3, dtype=np.int64),
        lengths=np.asarray([len(r.input_ids) for r in rows]),
        pad_id=0,
        truncated=np.zeros(3, dtype=bool),
    )
    want = collate(data, np.arange(3))
    del want["labels"]
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert "token_type_ids" not in pad_rows(rows[1:2], pad_id=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from lorakit.serve import ServeSettings, build_server

    root: Path = tmp_path_factory.mktemp("batcher")
    base = make_base(root / "base")
    adapter = make_adapter(root / "sst2", base)
    return build_server(
        ServeSettings(model=str(base), adapters=[("sst2", str(adapter))], precision="fp32")
    )


def test_large_requests_are_tokenized_off_the_event_loop(
    server,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lorakit.serve import INLINE_CHARS

    seen: list[str] = []
    encode = server.encode

    def watch(*args: object) -> object:
        seen.append(threading.current_thread().name)
        return encode(*args)

    monkeypatch.setattr(server, "encode", watch)
    adapter = server.adapter("sst2")
    short = [("the movie was good",)]
    large = [("good " * (INLINE_CHARS // 10),)] * 4  # twice INLINE_CHARS in all

    async def go() -> tuple[list, list, str]:
        small = await server.tokenize(adapter, short, None, "right")
        big = await server.tokenize(adapter, large, True, "right")
        return small, big, threading.current_thread().name

    small, big, loop_thread = asyncio.run(go())
    assert seen == [loop_thread, "lorakit-tokenize_0"]  # the sentence inline, the rest aside
    assert small[0][0].dtype == np.int64 and len(small[0][0]) > 2 and len(big) == 4
