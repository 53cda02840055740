"""``lorakit sweep --search tpe|random|grid``: an Optuna study of ``lorakit train`` trials.

The same command started on several machines (or twice on one) with one ``--storage`` shares
the study: each worker claims its next trial under a lock (a file lock beside a SQLite
database, a PostgreSQL advisory lock), so ``--trials N`` trials run in all, none twice, and a
grid point is never handed to two workers. Each trial is ``lorakit train`` in its own process,
as in the grid sweep; the worker reads the trial's metrics.jsonl as it grows, reports each
evaluation's dev score to the study and, when the pruner says the trial is hopeless, sends it
SIGTERM (it checkpoints and exits cleanly) and marks it PRUNED.

A worker that dies stops its trial's heartbeat: once it is older than the grace period, the
next worker to look marks the trial FAIL and enqueues it again (Optuna's
``RetryHeartbeatStaleTrialCallback``), under the same run directory, so it resumes from the dead
trial's checkpoint. Ctrl-C does the same at once. Workers return when the study holds N
finished trials and nothing is left running.

Files, as the grid sweep's: DIR/sweep.json (the plan), DIR/configs/trial-NNN.yaml,
DIR/runs/trial-NNN/, DIR/logs/trial-NNN.log, DIR/sweep.csv, DIR/sweep.md, DIR/sweep.png, plus
Optuna's DIR/optuna_history.png and DIR/optuna_importance.png. The study itself lives in the
storage (default ``sqlite:///DIR/study.db``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorakit.atomic import write_text
from lorakit.config import YamlLoader, load_config, save_config
from lorakit.errors import LoraKitError
from lorakit.runs import (
    check_overrides,
    config_key,
    die_with_parent,
    eval_records,
    label,
    last_line,
    read_json,
    split_values,
    write_csv,
    write_plan,
)

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")


@dataclass(frozen=True)
class Param:
    """One searched config key: a list of choices, or a numeric range (optionally log)."""

    key: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False

    @property
    def short(self) -> str:
        return self.key.rpartition(".")[2]

    def describe(self) -> Any:
        if self.choices:
            return [label(v) for v in self.choices]
        return {"low": self.low, "high": self.high, "log": self.log, "int": self.integer}

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            labels = [label(v) for v in self.choices]
            return self.choices[labels.index(trial.suggest_categorical(self.key, labels))]
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


def parse_param(spec: str) -> Param:
    """``KEY=V1,V2,...`` (choices, the grid syntax) or ``KEY=LOW..HIGH[:log]`` (a range)."""
    key, sep, text = spec.partition("=")
    if not sep or not key.strip() or not text.strip():
        raise LoraKitError(
            f"--grid {spec!r}: expected KEY=V1,V2,... or KEY=LOW..HIGH[:log] "
            "(e.g. learning_rate=1e-4..1e-2:log)"
        )
    dotted = config_key(key.strip())
    text = text.strip()
    if ".." in text and not text.startswith("["):
        bounds, _, scale = text.partition(":")
        lo_text, _, hi_text = bounds.partition("..")
        try:
            low, high = (yaml.load(v, Loader=YamlLoader) for v in (lo_text, hi_text))
        except yaml.YAMLError:
            low = high = None
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
        if not numbers or scale not in ("", "log") or not low < high:
            raise LoraKitError(
                f"--grid {spec!r}: a range is LOW..HIGH or LOW..HIGH:log, LOW < HIGH"
            )
        if scale == "log" and low <= 0:
            raise LoraKitError(f"--grid {spec!r}: a log range needs LOW > 0")
        integer = isinstance(low, int) and isinstance(high, int)
        return Param(dotted, (), float(low), float(high), scale == "log", integer)
    values = []
    for raw in split_values(text):
        try:
            values.append(yaml.load(raw, Loader=YamlLoader))
        except yaml.YAMLError:
            raise LoraKitError(f"--grid {spec!r}: cannot read the value {raw!r}") from None
    if not values or any(v is None for v in values) and "" in split_values(text):
        raise LoraKitError(f"--grid {spec!r}: an empty value")
    labels = [label(v) for v in values]
    if len(set(labels)) != len(labels):
        raise LoraKitError(f"--grid {spec!r}: a value is listed twice")
    return Param(dotted, tuple(values))


def task_metric(config: Any) -> str:
    """The score a run ranks by: its GLUE task's metric, accuracy for your own files."""
    from lorakit.data import GLUE_TASKS

    if config.data.train_file or config.data.subset not in GLUE_TASKS:
        return "accuracy"
    return GLUE_TASKS[config.data.subset].metric


@contextlib.contextmanager
def claim_lock(url: str, out: Path) -> Iterator[None]:
    """Serialize trial claims among workers: a file lock beside a SQLite database (workers on
    one machine), a session advisory lock on PostgreSQL (workers anywhere); other storages
    get the sweep directory's file lock, which holds for workers on one machine only."""
    if url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            key = "SELECT pg_advisory_lock(hashtext('lorakit-sweep-claim'))"
            conn.execute(sqlalchemy.text(key))
            try:
                yield
            finally:
                unlock = "SELECT pg_advisory_unlock(hashtext('lorakit-sweep-claim'))"
                conn.execute(sqlalchemy.text(unlock))
        engine.dispose()
        return
    path = Path(url.removeprefix("sqlite:///") + ".lock") if url.startswith("sqlite:///") else None
    path = path or out / "claim.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Search:
    """One worker of a study: claims trials, trains them, reports, prunes, writes the tables."""

    def __init__(
        self,
        config_path: Path | None,
        params: Sequence[Param],
        overrides: dict[str, Any],
        out: Path,
        *,
        sampler: str = "tpe",
        trials: int = 0,
        storage: str = "",
        study: str = "",
        pruner: str = "median",
        heartbeat: int = 30,
        seed: int | None = None,
    ) -> None:
        if sampler not in SAMPLERS:
            raise LoraKitError(f"--search takes {', '.join(SAMPLERS)}, not {sampler!r}")
        if pruner not in PRUNERS:
            raise LoraKitError(f"--pruner takes {', '.join(PRUNERS)}, not {pruner!r}")
        if not params:
            raise LoraKitError("--search needs a space: one --grid KEY=V1,V2 or KEY=LOW..HIGH")
        keys = [p.key for p in params]
        if len(set(keys)) != len(keys):
            raise LoraKitError(f"--grid: a key is searched twice ({', '.join(keys)})")
        check_overrides(overrides, keys)
        if sampler == "grid" and any(not p.choices for p in params):
            raise LoraKitError("--search grid takes lists of values, not LOW..HIGH ranges")
        for p in params:  # every listed value must make a valid run on its own
            for value in p.choices:
                try:
                    load_config(config_path, {**overrides, p.key: value})
                except LoraKitError as e:
                    raise LoraKitError(f"--grid {p.short}={label(value)}: {e}") from None
        size = math.prod(len(p.choices) for p in params) if sampler == "grid" else 0
        if trials < 0 or (not trials and sampler != "grid"):
            raise LoraKitError(f"--search {sampler} needs --trials N (N >= 1)")
        if heartbeat < 1:
            raise LoraKitError("--heartbeat must be at least 1 second")
        self.trials = min(trials, size) if trials and size else (trials or size)
        self.base = load_config(config_path, overrides)  # a bad file or flag fails here
        self.config_path, self.params, self.overrides = config_path, params, overrides
        self.out, self.sampler_name, self.pruner_name = out, sampler, pruner
        self.heartbeat, self.seed = heartbeat, seed
        self.storage_url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
        self.study_name = study or out.resolve().name
        self.metric = task_metric(self.base)
        self.selected_on = "dev" if self.base.training.dev_split else "validation"
        self._current: subprocess.Popen[bytes] | None = None
        self._stop_asked = False

    # ---- the study ---------------------------------------------------------------------

    def plan(self) -> dict[str, Any]:
        return {
            "search": self.sampler_name,
            "config": str(self.config_path) if self.config_path else None,
            "space": {p.key: p.describe() for p in self.params},
            "trials": self.trials,
            "overrides": self.overrides,
            "study": self.study_name,
            "pruner": self.pruner_name,
        }

    def prepare(self) -> None:
        """Write the plan (another worker may have); refuse a directory of another sweep."""
        write_plan(self.out, self.plan(), may_hold=("study.db", "study.db.lock"))
        self.study = self._open_study()

    def _open_study(self) -> Any:
        import optuna
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Heartbeats, stale-trial retries and the matplotlib plots are marked experimental;
        # ask/tell with heartbeats (not Study.optimize) is how a trial runs in its own process.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        warnings.filterwarnings("ignore", message="Target and region quantiles", module="optuna")
        kwargs: dict[str, Any] = {}
        if self.storage_url.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        try:
            with claim_lock(self.storage_url, self.out):  # workers create the tables once
                self.storage = RDBStorage(
                    self.storage_url,
                    heartbeat_interval=self.heartbeat,
                    grace_period=3 * self.heartbeat,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                    **kwargs,
                )
        except Exception as e:  # sqlalchemy's: a bad URL, a server that does not answer
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoraKitError(f"--storage {self.storage_url}: {first}") from None
        if self.sampler_name in ("grid", "random"):  # a grid is enqueued: see below
            sampler: Any = optuna.samplers.RandomSampler(seed=self.seed)
        else:
            # TPE models the space after a few random trials (a quarter of the budget, 2 to
            # 10); workers running side by side see each other's running trials as their
            # worst score so far (constant liar) instead of proposing the same point.
            startup = min(10, max(2, self.trials // 4))
            sampler = optuna.samplers.TPESampler(
                seed=self.seed, n_startup_trials=startup, constant_liar=True
            )
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=2)
            if self.pruner_name == "median"
            else optuna.pruners.NopPruner()
        )
        with claim_lock(self.storage_url, self.out):
            study = optuna.create_study(
                storage=self.storage,
                study_name=self.study_name,
                sampler=sampler,
                pruner=pruner,
                direction="maximize",
                load_if_exists=True,
            )
            if self.sampler_name == "grid" and not study.get_trials(deepcopy=False):
                # Every point as a waiting trial, in a seeded random order: workers pop them
                # under the claim lock, so none runs twice (Optuna's GridSampler stops the
                # study from inside Study.optimize, which a worker of its own does not run).
                points = list(
                    itertools.product(*([label(v) for v in p.choices] for p in self.params))
                )
                random.Random(self.seed).shuffle(points)
                for point in points[: self.trials]:  # --trials below the grid's size: a sample
                    study.enqueue_trial(dict(zip([p.key for p in self.params], point, strict=True)))
            return study

    def _claim(self) -> tuple[Any, dict[str, Any]] | None:
        """The next trial for this worker (a retried one first), or None when the study has
        its trials claimed."""
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        with claim_lock(self.storage_url, self.out):
            fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            states = [t.state for t in trials]
            busy = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            # A trial whose training failed (its error recorded) uses up its place; one failed
            # for a dead worker does not: its retry, waiting or claimed, takes the place.
            taken = sum(t.state in busy or "error" in t.user_attrs for t in trials)
            if TrialState.WAITING not in states and taken >= self.trials:
                return None
            trial = self.study.ask()
            values = {p.key: p.suggest(trial) for p in self.params}
            self.storage.record_heartbeat(trial._trial_id)
        return trial, values

    def _others_running(self) -> bool:
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        with claim_lock(self.storage_url, self.out):
            fail_stale_trials(self.study)
            states = [t.state for t in self.study.get_trials(deepcopy=False)]
        return TrialState.RUNNING in states or TrialState.WAITING in states

    def execute(self, show: Callable[[str], None] = print) -> int:
        """Claim and run trials until the study is done; returns how many failed here."""
        failed = 0
        previous = signal.signal(signal.SIGTERM, self._on_term)
        try:
            while not self._stop_asked:
                claimed = self._claim()
                if claimed is None:
                    if not self._others_running():
                        break
                    time.sleep(self.heartbeat)  # a dead worker's trial may come back to us
                    continue
                failed += not self._run_trial(*claimed, show)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.write_results()
        return failed

    def _on_term(self, signum: int, frame: Any) -> None:
        self._stop_asked = True
        if self._current is not None and self._current.poll() is None:
            self._current.send_signal(signal.SIGTERM)

    # ---- one trial ---------------------------------------------------------------------

    def _run_name(self, trial: Any) -> str:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        frozen = self.storage.get_trial(trial._trial_id)
        root = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        return f"trial-{trial.number if root is None else root:03d}"

    def _run_trial(self, trial: Any, values: dict[str, Any], show: Callable[[str], None]) -> bool:
        from optuna.trial import TrialState

        name = self._run_name(trial)
        trial.set_user_attr("run", name)
        # A retry continues its own run, whatever else finished with the same values.
        retry = name != f"trial-{trial.number:03d}"
        duplicate = None if retry else self._same_params_done(trial)
        if duplicate is not None:  # the sampler proposed a finished point: its score stands
            trial.set_user_attr("duplicate_of", duplicate.number)
            self.study.tell(trial, duplicate.value)
            show(f"= trial {trial.number}: same values as trial {duplicate.number}, not rerun")
            return True
        run_dir = self.out / "runs" / name
        overrides = {**self.overrides, **values, "training.output_dir": str(run_dir)}
        config_file = self.out / "configs" / f"{name}.yaml"
        try:
            config = load_config(self.config_path, overrides)
        except LoraKitError as e:  # a value of a range the config refuses: the trial fails
            trial.set_user_attr("error", str(e))
            self.study.tell(trial, state=TrialState.FAIL)
            show(f"✘ trial {trial.number}: {e}")
            return False
        save_config(config, config_file)
        spelled = ", ".join(f"{k.rpartition('.')[2]}={label(v)}" for k, v in values.items())
        show(f"▶ trial {trial.number} ({name}): {spelled}")
        log_path = self.out / "logs" / f"{name}.log"
        try:
            code, pruned = self._launch(trial, config, config_file, log_path)
        except KeyboardInterrupt:
            self._give_back(trial)
            raise
        if self._stop_asked or code in (130, -signal.SIGINT) and not pruned:
            self._give_back(trial)
            raise KeyboardInterrupt
        if pruned:
            self.study.tell(trial, state=TrialState.PRUNED)
            show(f"✂ trial {trial.number} pruned at step {pruned}")
            return True
        summary = read_json(run_dir / "summary.json")
        if code == 0 and summary is not None:
            value = self._score(summary)
            self.study.tell(trial, value)
            show(f"✔ trial {trial.number}: {self.selected_on} {self.metric} {value:.4f}")
            return True
        trial.set_user_attr("error", last_line(log_path))
        self.study.tell(trial, state=TrialState.FAIL)
        show(f"✘ trial {trial.number}: {last_line(log_path)}")
        return False

    def _launch(
        self, trial: Any, config: Any, config_file: Path, log_path: Path
    ) -> tuple[int, int]:
        """``lorakit train`` for the trial (resuming its checkpoint if one is there), with its
        heartbeat beating; (exit code, pruned-at step)."""
        run_dir = Path(config.training.output_dir)
        beating = threading.Event()
        beat = threading.Thread(target=self._beat, args=(trial, beating), daemon=True)
        beat.start()
        # The run directory's lock, held by the worker and inherited by its training process:
        # a dead worker's training may still be saving its checkpoint (SIGTERM from
        # PR_SET_PDEATHSIG); a retry waits for it instead of writing beside it.
        lock = open(run_dir.parent / f"{run_dir.name}.lock", "a")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cmd = [sys.executable, "-m", "lorakit", "train", "--config", str(config_file)]
            cmd.append("--resume" if (run_dir / "checkpoint").is_dir() else "--overwrite")
            return self._train(trial, cmd, config, log_path, lock.fileno())
        finally:
            lock.close()
            beating.set()
            beat.join()

    def _score(self, summary: dict[str, Any]) -> float:
        chosen = summary.get("best_dev") if self.selected_on == "dev" else summary.get("best_eval")
        return float((chosen or {}).get(self.metric, summary.get("best_metric") or 0.0))

    def _same_params_done(self, trial: Any) -> Any | None:
        from optuna.trial import TrialState

        mine = self.storage.get_trial(trial._trial_id).params
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if other.params == mine and other.user_attrs.get("duplicate_of") is None:
                return other
        return None

    def _beat(self, trial: Any, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat):
            with contextlib.suppress(Exception):  # a storage hiccup: the next beat retries
                self.storage.record_heartbeat(trial._trial_id)

    def _give_back(self, trial: Any) -> None:
        """Ctrl-C: the trial fails now and comes back as a retry that resumes its checkpoint."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        self.study.tell(trial, state=TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback(max_retry=3)(
            self.study, self.storage.get_trial(trial._trial_id)
        )

    def _train(
        self, trial: Any, cmd: list[str], config: Any, log_path: Path, lock_fd: int
    ) -> tuple[int, int]:
        """Run the trial's training, reporting each evaluation; (exit code, pruned-at step)."""
        reported = 0
        metrics = Path(config.training.output_dir) / "metrics.jsonl"
        key = f"dev_{self.metric}" if self.selected_on == "dev" else self.metric
        with open(log_path, "ab") as log:
            self._current = child = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
                pass_fds=(lock_fd,),
            )
            try:
                while True:
                    running = child.poll() is None  # then read: an exited run's file is whole
                    evals = eval_records(metrics)
                    for record in evals[reported:]:
                        if key in record:
                            trial.report(float(record[key]), int(record["step"]))
                            last = _is_last_eval(record, config)  # nothing left to save
                            if not last and trial.should_prune() and child.poll() is None:
                                child.send_signal(signal.SIGTERM)  # it checkpoints and exits
                                child.wait()
                                return child.returncode, int(record["step"])
                    reported = len(evals)
                    if not running:
                        break
                    time.sleep(0.5)
            except KeyboardInterrupt:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
                    child.wait()
                raise
            finally:
                self._current = None
        return child.returncode, 0

    # ---- results -----------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """One sweep.csv row per finished trial (complete or pruned), best first."""
        from optuna.trial import TrialState

        rows = []
        for t in self.study.get_trials(deepcopy=False):
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            name = t.user_attrs.get("run", f"trial-{t.number:03d}")
            summary = read_json(self.out / "runs" / name / "summary.json") or {}
            evals = eval_records(self.out / "runs" / name / "metrics.jsonl")
            last = evals[-1] if evals else {}
            score = t.value if t.state == TrialState.COMPLETE else _last_value(t)
            row: dict[str, Any] = {"trial": t.number, "run": name, "state": t.state.name.lower()}
            row.update({p.short: t.params.get(p.key) for p in self.params})
            row[f"{self.selected_on}_{self.metric}"] = score
            row[f"validation_{self.metric}"] = (summary.get("best_eval") or last).get(self.metric)
            row["steps"] = max(t.intermediate_values, default=None)
            row["train_time_s"] = summary.get("train_runtime_s")
            row["duplicate_of"] = t.user_attrs.get("duplicate_of")
            rows.append(row)
        key = f"{self.selected_on}_{self.metric}"
        rows.sort(key=lambda r: (r["state"] != "complete", -(r[key] or 0.0)))
        return rows

    def write_results(self) -> None:
        rows = self.rows()
        if not rows:
            return
        write_csv(self.out / "sweep.csv", rows)
        write_text(self.out / "sweep.md", self.markdown(rows))
        self._plots(rows)

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        key = f"{self.selected_on}_{self.metric}"
        done = sum(r["state"] == "complete" for r in rows)
        pruned = len(rows) - done
        lines = [
            f"# Search ({self.sampler_name}, study {self.study_name}): {done} complete, "
            f"{pruned} pruned, of {self.trials} trials",
            "",
            f"Ranked by the **{self.selected_on}** {self.metric} of each trial's best/ "
            + (
                "(rows held out of the training data; validation is only reported)."
                if self.selected_on == "dev"
                else "(no --dev_split: validation both chose and scored, an optimistic estimate)."
            )
            + " A pruned trial shows its last reported score and where it stopped.",
            "",
        ]
        cols = [
            "#",
            "trial",
            "state",
            *(p.short for p in self.params),
            key,
            f"validation_{self.metric}",
            "steps",
        ]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for i, r in enumerate(rows, 1):
            cells = [str(i), str(r["trial"]), r["state"]]
            cells += [label(r[p.short]) if p.choices else f"{r[p.short]:.4g}" for p in self.params]
            cells += [_pct(r[key]), _pct(r[f"validation_{self.metric}"]), str(r["steps"] or "")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join([*lines, ""])

    def _plots(self, rows: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ov

        key = f"{self.selected_on}_{self.metric}"
        first = self.params[0]
        fig, ax = plt.subplots(figsize=(7, 4))
        for state, marker in (("complete", "o"), ("pruned", "x")):
            chosen = [r for r in rows if r["state"] == state and r[key] is not None]
            xs = [label(r[first.short]) if first.choices else r[first.short] for r in chosen]
            ax.scatter(xs, [100 * r[key] for r in chosen], marker=marker, label=state)
        if not first.choices and first.log:
            ax.set_xscale("log")
        ax.set_xlabel(first.short)
        ax.set_ylabel(f"{self.selected_on} {self.metric} (%)")
        ax.set_title(f"lorakit sweep --search {self.sampler_name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "sweep.png", dpi=110)
        plt.close(fig)
        for name, plot in (
            ("history", ov.plot_optimization_history),
            ("importance", ov.plot_param_importances),
        ):
            with contextlib.suppress(Exception):  # importance needs two complete trials
                plot(self.study)
                plt.gcf().set_size_inches(7, 4)
                plt.tight_layout()
                plt.savefig(self.out / f"optuna_{name}.png", dpi=110)
            plt.close("all")

    def best_line(self) -> str:
        rows = [r for r in self.rows() if r["state"] == "complete"]
        if not rows:
            return ""
        r = rows[0]
        spelled = ", ".join(f"{p.short}={label(r[p.short])}" for p in self.params)
        key = f"{self.selected_on}_{self.metric}"
        return (
            f"🏆 best on {self.selected_on}: trial {r['trial']} ({spelled}): {self.metric} "
            f"{_pct(r[key])}, validation {_pct(r[f'validation_{self.metric}'])}"
        )


def _is_last_eval(record: dict[str, Any], config: Any) -> bool:
    """The run's closing evaluation: pruning it would save nothing."""
    t = config.training
    return float(record.get("epoch", 0)) >= t.num_epochs or bool(
        t.max_steps and int(record.get("step", 0)) >= t.max_steps
    )


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _last_value(trial: Any) -> float | None:
    if not trial.intermediate_values:
        return None
    return float(trial.intermediate_values[max(trial.intermediate_values)])
