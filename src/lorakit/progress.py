"""Progress bars that suit where they are shown: tqdm in a terminal, a plain line now and then
elsewhere (CI, nohup, output redirected to a file), where each of tqdm's carriage-return
redraws would become one more line of the log."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, Protocol, TextIO

from tqdm import tqdm

EVERY = 10.0  # seconds between lines when not in a terminal


class Progress(Protocol):
    """What train.py and predict_files.py use of a tqdm bar."""

    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, **kwargs: Any) -> Any: ...
    def close(self) -> None: ...
    def __enter__(self) -> Progress: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any: ...


def progress(
    total: int,
    desc: str,
    *,
    initial: int = 0,
    unit: str = "it",
    leave: bool = True,
    disable: bool = False,
    stream: TextIO | None = None,
    every: float = EVERY,
) -> Progress:
    """A tqdm bar on ``stream`` (default stderr) if it is a terminal, else a ``LineProgress``."""
    stream = stream or sys.stderr
    if stream.isatty() or disable:
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            leave=leave,
            disable=disable,
            dynamic_ncols=True,
            file=stream,
        )
    return LineProgress(total, desc, initial=initial, unit=unit, stream=stream, every=every)


class LineProgress:
    """Writes ``desc: n/total (pct) rate unit/s, elapsed, postfix`` at most every ``every`` s.

    A run shorter than ``every`` writes nothing; a longer one also writes a last line on close.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        initial: int = 0,
        unit: str = "it",
        stream: TextIO,
        every: float = EVERY,
    ) -> None:
        self.total, self.desc, self.unit, self.stream, self.every = total, desc, unit, stream, every
        self.n = self.start_n = self.written_n = initial
        self.start = self.last = time.monotonic()
        self.postfix: dict[str, Any] = {}
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._write()

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = kwargs

    def close(self) -> None:
        if self.lines and self.n != self.written_n:
            self._write()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write(self) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        parts = [
            f"{self.desc}: {self.n}/{self.total}{pct}",
            f"{rate:.2f} {self.unit}/s",
            f"elapsed {tqdm.format_interval(elapsed)}",
            *(f"{k}={v}" for k, v in self.postfix.items()),
        ]
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.last, self.written_n, self.lines = now, self.n, self.lines + 1
