"""``lorakit sweep``: one ``lorakit train`` per grid point and seed, resumable, with a table.

Each run is its own process (a clean allocator, RNG and thread pool per run) writing its own
output directory; the sweep only plans, starts, watches and tabulates::

    DIR/sweep.json        the plan: config file, grid, seeds, fixed overrides, run names
    DIR/configs/NAME.yaml each run's resolved configuration (``lorakit train --config`` it)
    DIR/runs/NAME/        each run's output directory (best/, final/, summary.json ...)
    DIR/logs/NAME.log     each run's console output
    DIR/sweep.csv         one row per finished run
    DIR/sweep.md          mean ± std over seeds per point, best first
    DIR/sweep.png         the ranking metric against the first swept axis, with error bars

A rerun of the same command skips finished runs (``summary.json`` exists), resumes a killed
one from its checkpoint, and starts the rest.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.atomic import write_text
from lorakit.config import Config, YamlLoader, load_config, save_config
from lorakit.errors import LoraKitError
from lorakit.runs import (
    check_overrides,
    config_key,
    die_with_parent,
    label,
    last_line,
    split_values,
    tail,
    write_csv,
    write_plan,
)

SEED = "training.seed"


@dataclass(frozen=True)
class Axis:
    """One swept config key and its values, in the order given."""

    key: str  # dotted config key, e.g. "lora.rank"
    values: tuple[Any, ...]

    @property
    def short(self) -> str:
        return self.key.rpartition(".")[2]


@dataclass
class Run:
    """One training run: a grid point with one seed."""

    name: str
    point: str  # the name without the seed: runs of one point differ only in seed
    values: dict[str, Any]  # swept dotted key -> value (the seed included)
    status: str = "left"  # left, running, done, failed
    detail: str = ""  # what the table shows beside the status
    summary: dict[str, Any] = field(default_factory=dict)


def parse_grid(spec: str) -> Axis:
    """``KEY=V1,V2,...`` (or ``KEY=V1;V2`` when values hold commas) into an ``Axis``.

    Values are read as YAML: ``5e-4`` is a number, ``[query,value]`` a list, ``true`` a bool.
    """
    key, sep, text = spec.partition("=")
    if not sep or not key.strip() or not text.strip():
        raise LoraKitError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. lora.rank=4,8,16)")
    values = []
    for raw in split_values(text):
        if not raw:
            raise LoraKitError(f"--grid {spec!r}: an empty value")
        try:
            values.append(yaml.load(raw, Loader=YamlLoader))
        except yaml.YAMLError:
            raise LoraKitError(f"--grid {spec!r}: cannot read the value {raw!r}") from None
    return Axis(config_key(key.strip()), tuple(values))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise LoraKitError(f"--seeds {text!r}: expected integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise LoraKitError(f"--seeds {text!r}: expected distinct integers, e.g. 0,1,2")
    return seeds


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,+=-]+", "_", text)


def plan_runs(axes: Sequence[Axis], seeds: Sequence[int]) -> list[Run]:
    """Every combination of the axes' values, each with every seed; names are unique."""
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise LoraKitError(f"--grid: a key is swept twice ({', '.join(keys)})")
    if SEED in keys:
        raise LoraKitError("--grid: sweep seeds with --seeds, not --grid")
    runs, seen = [], set()
    for combo in itertools.product(*(a.values for a in axes)):
        pairs = zip(axes, combo, strict=True)
        point = _safe(",".join(f"{a.short}={label(v)}" for a, v in pairs) or "base")
        if point in seen:
            raise LoraKitError(f"--grid: two points would share the name {point!r}")
        seen.add(point)
        for seed in seeds:
            values = dict(zip(keys, combo, strict=True))
            values[SEED] = seed
            runs.append(Run(f"{point},seed={seed}", point, values))
    return runs


class Sweep:
    """A planned sweep in ``out``: runs the runs not yet finished and writes the tables."""

    def __init__(
        self,
        config_path: Path | None,
        axes: Sequence[Axis],
        seeds: Sequence[int] | None,
        overrides: dict[str, Any],
        out: Path,
    ) -> None:
        self._stop_asked = False  # SIGTERM came during execute
        self._current: subprocess.Popen[bytes] | None = None  # the running lorakit train
        check_overrides(overrides, [a.key for a in axes])
        if seeds is not None and SEED in overrides:
            raise LoraKitError("pass either --seeds or --seed, not both")
        base = load_config(config_path, overrides)  # a bad file or flag fails before planning
        self.seeds = list(seeds) if seeds is not None else [base.training.seed]
        self.axes, self.out = list(axes), out
        self.config_path, self.overrides = config_path, overrides
        self.runs = plan_runs(self.axes, self.seeds)
        self.configs = {run.name: self._config(run) for run in self.runs}
        first = self.configs[self.runs[0].name]
        self.selected_on = "dev" if first.training.dev_split else "validation"

    def _config(self, run: Run) -> Config:
        overrides = {**self.overrides, **run.values}
        overrides["training.output_dir"] = str(self.out / "runs" / run.name)
        try:
            return load_config(self.config_path, overrides)
        except LoraKitError as e:
            raise LoraKitError(f"run {run.name}: {e}") from None

    def plan(self) -> dict[str, Any]:
        return {
            "config": str(self.config_path) if self.config_path else None,
            "grid": {a.key: list(a.values) for a in self.axes},
            "seeds": self.seeds,
            "overrides": self.overrides,
            "runs": [r.name for r in self.runs],
        }

    def prepare(self) -> None:
        """Write the plan and the run configs; refuse a directory holding another sweep, but
        extend this one when the command adds seeds or grid values (finished runs stay)."""
        write_plan(self.out, self.plan(), grows=("grid", "seeds", "runs"))
        for run in self.runs:
            save_config(self.configs[run.name], self._config_file(run))
            summary = self._read_summary(run)
            if summary is not None:
                run.status, run.summary = "done", summary

    def _config_file(self, run: Run) -> Path:
        return self.out / "configs" / f"{run.name}.yaml"

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def _read_summary(self, run: Run) -> dict[str, Any] | None:
        path = self.run_dir(run) / "summary.json"
        if not path.is_file():
            return None
        try:
            summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        summary["adapter_kib"] = _weights_kib(self.run_dir(run) / "best")
        return summary

    def command(self, run: Run) -> list[str]:
        """``lorakit train`` for ``run``: resume from its checkpoint if a killed run left one."""
        cmd = [sys.executable, "-m", "lorakit", "train", "--config", str(self._config_file(run))]
        if (self.run_dir(run) / "checkpoint").is_dir():
            return [*cmd, "--resume"]
        return [*cmd, "--overwrite"]  # a run killed before its first checkpoint starts over

    def execute(self, show: Callable[[Sweep], None] | None = None) -> int:
        """Run every run not done, one at a time; returns how many failed.

        Ctrl-C (or SIGTERM) reaches the running ``lorakit train``, which checkpoints and
        exits; the sweep then stops and raises ``KeyboardInterrupt``.
        """
        failed = 0
        self._stop_asked, self._current = False, None
        previous = signal.signal(signal.SIGTERM, self._on_term)
        try:
            for run in self.runs:
                if run.status != "done":
                    failed += not self._run_one(run, show)
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.write_results()
        return failed

    def _on_term(self, signum: int, frame: Any) -> None:
        self._stop_asked = True
        if self._current is not None and self._current.poll() is None:
            self._current.send_signal(signal.SIGTERM)

    def _run_one(self, run: Run, show: Callable[[Sweep], None] | None) -> bool:
        """Train ``run`` to its end; True when it finished with a summary."""
        run.status, run.detail = "running", "starting"
        self._refresh(show)
        log_path = self.out / "logs" / f"{run.name}.log"
        code = self._train(run, log_path, show)
        if code in (130, -signal.SIGINT) or self._stop_asked:
            run.status, run.detail = "left", "interrupted"
            raise KeyboardInterrupt
        summary = self._read_summary(run)
        if code == 0 and summary is not None:
            run.status, run.summary, run.detail = "done", summary, ""
        else:
            run.status, run.detail = "failed", last_line(log_path)
        self.write_results()
        self._refresh(show)
        return run.status == "done"

    def _train(self, run: Run, log_path: Path, show: Callable[[Sweep], None] | None) -> int:
        """``lorakit train`` for ``run`` in a process of its own; its exit code."""
        with open(log_path, "ab") as log:
            started = time.monotonic()
            try:
                self._current = current = subprocess.Popen(
                    self.command(run),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
                while current.poll() is None:
                    run.detail = self._progress(run, time.monotonic() - started)
                    self._refresh(show)
                    time.sleep(0.5)
            except KeyboardInterrupt:
                # A terminal's Ctrl-C reached train too (one process group): it checkpoints
                # and exits. A SIGINT sent to the sweep alone is passed on.
                if self._current is not None:
                    try:
                        self._current.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        self._current.send_signal(signal.SIGINT)
                        self._current.wait()
                raise
        return current.returncode

    def _refresh(self, show: Callable[[Sweep], None] | None) -> None:
        if show is not None:
            show(self)

    def _progress(self, run: Run, seconds: float) -> str:
        """The running run's last logged epoch and loss, from its metrics.jsonl."""
        last = _last_record(self.run_dir(run) / "metrics.jsonl")
        total = self.configs[run.name].training.num_epochs
        where = f"epoch {last['epoch']:.2f}/{total} loss {last['loss']:.3f} " if last else ""
        return f"{where}{seconds:.0f} s"

    # ---- results -------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """One ``sweep.csv`` row per finished run."""
        rows = []
        for run in self.runs:
            if run.status != "done":
                continue
            s = run.summary
            metric = s.get("best_metric_name", "accuracy")
            row: dict[str, Any] = {"run": run.name, "point": run.point}
            row.update({a.short: label(run.values[a.key]) for a in self.axes})
            row["seed"] = run.values[SEED]
            row.update(
                method=s.get("method", "lora"),
                trainable_params=s.get("trainable_params"),
                adapter_kib=s.get("adapter_kib"),
                train_time_s=s.get("train_runtime_s"),
                examples_per_sec=s.get("train_examples_per_sec"),
                peak_rss_mb=s.get("peak_rss_mb"),
                selected_on=s.get("selected_on", "validation"),
                best_epoch=s.get("best_epoch"),
            )
            for name in dict.fromkeys((metric, "accuracy")):
                row[f"dev_{name}"] = (s.get("best_dev") or {}).get(name)
                row[f"validation_{name}"] = (s.get("best_eval") or {}).get(name)
                row[f"final_validation_{name}"] = (s.get("final_eval") or {}).get(name)
            row["metric"] = metric
            rows.append(row)
        return rows

    def write_results(self) -> None:
        rows = self.rows()
        write_csv(self.out / "sweep.csv", rows)
        points = summarize(rows, [a.short for a in self.axes], self.selected_on)
        write_text(self.out / "sweep.md", self.markdown(points))
        if points:
            from lorakit.plots import plot_sweep

            x = self.axes[0].short if self.axes else "point"
            plot_sweep(points, x, [a.short for a in self.axes[1:]], self.out / "sweep.png")

    def best_line(self) -> str:
        """The winning point in one line, or "" before any run has finished."""
        points = summarize(self.rows(), [a.short for a in self.axes], self.selected_on)
        if not points:
            return ""
        p = points[0]
        return (
            f"🏆 best on {self.selected_on}: {p['point']} ({p['metric']}: dev "
            f"{mean_std(p['dev'])}, validation {mean_std(p['validation'])}, {p['n']} seeds)"
        )

    def markdown(self, points: list[dict[str, Any]]) -> str:
        left = sum(r.status != "done" for r in self.runs)
        ranking = (
            "Ranked by the mean **dev** score over seeds (rows held out of the training data, "
            "`--dev_split`); the validation score is only reported, it chose nothing."
            if self.selected_on == "dev"
            else "Ranked by the mean **validation** score over seeds: no `--dev_split` was "
            "given, so the validation split both chose and scored (an optimistic estimate)."
        )
        lines = [
            f"# Sweep: {len(self.runs) - left} of {len(self.runs)} runs done",
            "",
            ranking + " Each run's best/ is its best evaluation on the same set.",
            "",
        ]
        if not points:
            return "\n".join([*lines, "No run has finished yet.", ""])
        metric = points[0]["metric"]
        head = [a.short for a in self.axes]
        cols = [
            "#",
            *head,
            "seeds",
            f"dev {metric}",
            f"validation {metric}",
            "trainable params",
            "adapter KiB",
            "examples/s",
            "train s",
        ]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for i, p in enumerate(points, 1):
            cells = [
                str(i),
                *(str(p["values"][h]) for h in head),
                str(p["n"]),
                mean_std(p["dev"]),
                mean_std(p["validation"]),
                f"{p['trainable_params']:,.0f}" if p["trainable_params"] else "",
                f"{p['adapter_kib']:,.0f}" if p["adapter_kib"] else "",
                f"{p['examples_per_sec']:.1f}" if p["examples_per_sec"] else "",
                f"{p['train_time_s']:.0f}" if p["train_time_s"] else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Scores are mean ± sample standard deviation over the seeds, in percent; "
            "train s, examples/s and adapter KiB are means. For head-only and full fine-tuning "
            "runs adapter KiB is the whole saved model.",
            "",
        ]
        return "\n".join(lines)


def summarize(rows: list[dict[str, Any]], axes: list[str], selected_on: str) -> list[dict]:
    """Rows grouped by point: scores per seed and means, best first by the ranking set."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["point"], []).append(row)
    points = []
    for name, group in groups.items():
        metric = group[0]["metric"]
        dev = [100 * r[f"dev_{metric}"] for r in group if r.get(f"dev_{metric}") is not None]
        val = [
            100 * r[f"validation_{metric}"]
            for r in group
            if r.get(f"validation_{metric}") is not None
        ]
        points.append(
            {
                "point": name,
                "values": {a: group[0][a] for a in axes},
                "metric": metric,
                "n": len(group),
                "dev": dev,
                "validation": val,
                "stats": {
                    "dev": (_mean(dev) if dev else math.nan, std(dev)),
                    "validation": (_mean(val) if val else math.nan, std(val)),
                },
                **{
                    k: _mean([r[k] for r in group if r.get(k) is not None])
                    for k in ("trainable_params", "adapter_kib", "examples_per_sec", "train_time_s")
                },
            }
        )
    key = "dev" if selected_on == "dev" else "validation"
    points.sort(key=lambda p: -_mean(p[key]) if p[key] else math.inf)
    return points


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_std(values: Sequence[float]) -> str:
    """Mean ± sample standard deviation to two decimals ("—" for none, the value for one)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{_mean(values):.2f} ± {std(values):.2f}"


def _weights_kib(directory: Path) -> float | None:
    files = list(directory.glob("*.safetensors"))
    return round(sum(f.stat().st_size for f in files) / 1024, 1) if files else None


def _last_record(path: Path) -> dict[str, Any] | None:
    for line in reversed(tail(path).splitlines()):
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            return record
    return None
