"""What the grid sweep and the search share: config keys and values as the command line spells
them, the plan file, the child ``lorakit train`` processes, and reading a run's files."""

from __future__ import annotations

import csv
import io
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.atomic import write_text
from lorakit.config import flag_table
from lorakit.errors import LoraKitError

# Keys the sweep sets for every run itself.
OWN_KEYS = ("training.output_dir", "training.resume", "training.overwrite")
# Keys that would make runs unattended: uploads belong after choosing, not inside a sweep.
REFUSED_KEYS = ("training.push_to_hub",)
PLAN_NAME = "sweep.json"


def config_key(name: str) -> str:
    """A dotted config key from a dotted key or a flag name (``rank``, ``lora_r``, ``lr``...)."""
    table = flag_table()
    if name in table:
        return name
    for dotted, (names, _, _) in table.items():
        if name in names:
            return dotted
    raise LoraKitError(f"--grid: unknown config key {name!r} (use a train flag name or lora.rank)")


def split_values(text: str) -> list[str]:
    """``a;b`` splits on ``;``; otherwise on commas outside brackets (``[q,v],[q,k,v]``)."""
    if ";" in text:
        return [v.strip() for v in text.split(";")]
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return parts


def label(value: Any) -> str:
    """A value as it appears in run names and tables: lists joined by ``+``."""
    if isinstance(value, list):
        return "+".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def check_overrides(overrides: dict[str, Any], swept: Sequence[str]) -> None:
    """Refuse flags the sweep sets itself, uploads, and flags that set a swept key."""
    for key in (*OWN_KEYS, *REFUSED_KEYS):
        if key in overrides:
            raise LoraKitError(f"lorakit sweep sets {key} itself; do not pass it")
    both = [key for key in swept if key in overrides]
    if both:  # the grid would silently win over the flag
        raise LoraKitError(f"--grid sweeps {both[0]}, which a flag also sets; drop one")


def write_plan(
    out: Path, plan: dict[str, Any], may_hold: Sequence[str] = (), grows: Sequence[str] = ()
) -> None:
    """Write ``out``'s sweep.json and its folders, unless ``out`` holds another sweep or other
    files than ``may_hold``. The same plan is a rerun, continued; a plan whose ``grows`` entries
    hold everything the saved ones do (more seeds, more grid values) and is the same otherwise
    extends the saved sweep."""
    plan_path = out / PLAN_NAME
    if plan_path.is_file():
        try:
            saved = json.loads(plan_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoraKitError(f"cannot read {plan_path}: {e}") from None
        if not _extends(json.loads(json.dumps(plan)), saved, grows):
            raise LoraKitError(
                f"{out} holds another sweep ({plan_path} differs); rerun that sweep's "
                "command to continue it, or choose a new --output_dir"
            )
    elif out.exists() and any(p.name not in may_hold for p in out.iterdir()):
        raise LoraKitError(f"output_dir {out} is not empty and holds no sweep")
    for sub in ("configs", "logs", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    write_text(plan_path, json.dumps(plan, indent=2) + "\n")


def _extends(plan: Any, saved: Any, grows: Sequence[str]) -> bool:
    """``plan`` equals ``saved`` but for the ``grows`` keys, whose lists (or dicts of lists)
    may only have gained items."""
    if not isinstance(plan, dict) or not isinstance(saved, dict) or plan.keys() != saved.keys():
        return plan == saved
    return all(_holds(plan[k], saved[k]) if k in grows else plan[k] == saved[k] for k in plan)


def _holds(new: Any, old: Any) -> bool:
    if isinstance(new, dict) and isinstance(old, dict):
        return new.keys() == old.keys() and all(_holds(new[k], old[k]) for k in new)
    if isinstance(new, list) and isinstance(old, list):
        return all(item in new for item in old)
    return bool(new == old)


def die_with_parent() -> None:
    """In the child: SIGTERM when the sweep dies (Linux), so a killed sweep's run checkpoints
    and stops instead of running on beside the rerun."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def last_line(path: Path) -> str:
    lines = [ln for ln in tail(path).splitlines() if ln.strip()]
    return lines[-1].strip()[:200] if lines else "no output"


def tail(path: Path, size: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


def eval_records(path: Path) -> list[dict[str, Any]]:
    """The eval records of a metrics.jsonl so far (a half-written last line is left out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "eval":
            out.append(record)
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV file, the union of their keys as columns, first-seen order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
