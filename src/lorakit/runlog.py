"""What a run tells the person watching and the files that keep it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lorakit.atomic import write_text


class RunLog:
    """Prints lines (above any progress bar), appends them to the log file, writes metrics.jsonl."""

    def __init__(self, log_path: Path, metrics_path: Path, quiet: bool = False) -> None:
        self.log_path, self.metrics_path, self.quiet = log_path, metrics_path, quiet

    def line(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text)
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(text + "\n")

    def metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """On resume: keep only what the checkpoint knew, dropping lines logged after it."""
        write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))


class SilentLog(RunLog):
    """What the other processes of a distributed run keep: rank 0 alone prints and writes."""

    def __init__(self) -> None:
        super().__init__(Path(os.devnull), Path(os.devnull), quiet=True)

    def line(self, text: str) -> None:
        pass

    def metrics(self, record: dict[str, Any]) -> None:
        pass

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        pass
