"""``lorakit sweep``: a grid of ``lorakit train`` runs over seeds, with a live table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.commands.flags import add_config_flags, config_overrides

if TYPE_CHECKING:
    from lorakit.sweep import Sweep

HELP = "train every point of a grid over seeds, each in its own process; resumable"
EPILOG = """\
grid syntax:
  --grid KEY=V1,V2,...   KEY is a train flag (rank, learning_rate, method ...) or a dotted
                         key (lora.rank); values are YAML (5e-4, true, [query,value])
  --grid "target_modules=[query,value],[query,key,value,dense]"   lists: commas inside [ ]
  --grid "target_modules=all-linear;[query,value]"                or separate values with ;
Every combination of the --grid values runs once per --seeds value. Other train flags
(--dev_split, --max_train_samples, --num_epochs ...) apply to every run.

--dev_split N (rows) or a fraction holds those training rows out: each run's best/ and the
sweep's ranking use them, and the validation split is only reported. Without it, validation
both chooses and scores (sweep.md says which).

Writes DIR/sweep.csv (one row per run), DIR/sweep.md (mean ± std over seeds, best first),
DIR/sweep.png, and each run's own output in DIR/runs/NAME (logs in DIR/logs). Rerunning the
same command skips finished runs and resumes a killed one from its checkpoint.

searched sweeps (Optuna; pip install 'lorakit[optuna]'):
  --search tpe|random|grid --trials N   N trials chosen by the sampler over the --grid space;
                         --grid KEY=LOW..HIGH[:log] is a numeric range (int if both ends are)
  --storage URL          the study (default sqlite:///DIR/study.db); postgresql://user@host/db
                         lets workers on several machines share it: start the same command on
                         each, N trials run in all and none twice
  --study NAME           the study's name in the storage (default: DIR's name)
  --pruner median|none   stop a trial whose dev score at an evaluation is below the median of
                         earlier trials at that step (use --eval_steps for several per epoch)
A worker killed mid-trial: its trial is marked failed once its heartbeat is older than 3x
--heartbeat seconds, and retried (resuming its checkpoint) by the next worker to look.
Also writes DIR/optuna_history.png and DIR/optuna_importance.png.
"""
OWN_FLAGS = ("output_dir", "resume", "overwrite", "push_to_hub", "hub_model_id", "hub_private")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--config", type=Path, help="YAML file shaped like configs/*.yaml")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=VALUES",
        help="a swept key and its values (repeatable; see below)",
    )
    parser.add_argument("--seeds", help="comma-separated seeds, each point runs once per seed")
    parser.add_argument(
        "--output_dir", type=Path, required=True, help="the sweep's directory (see below)"
    )
    parser.add_argument("--search", choices=("tpe", "random", "grid"), help="an Optuna search")
    parser.add_argument("--trials", type=int, default=0, help="trials of the search, in all")
    parser.add_argument("--storage", default="", help="Optuna storage URL of the study")
    parser.add_argument("--study", default="", help="the study's name (default: DIR's name)")
    parser.add_argument("--pruner", choices=("median", "none"), default="median")
    parser.add_argument(
        "--heartbeat", type=int, default=30, help="seconds between a trial's heartbeats"
    )
    parser.add_argument("--sampler_seed", type=int, help="seed of the sampler (one worker)")
    from lorakit.config import flag_table

    names = [n for names, _, _ in flag_table().values() for n in names]
    add_config_flags(parser, only=[n for n in names if n not in OWN_FLAGS])


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import LoraKitError
    from lorakit.sweep import Sweep, parse_grid, parse_seeds

    if args.search:
        return _search(args)
    searched = [f for f in ("trials", "storage", "study", "sampler_seed") if getattr(args, f)]
    if searched:
        raise LoraKitError(f"--{searched[0]} belongs to a search: add --search tpe|random|grid")

    axes = [parse_grid(spec) for spec in args.grid]
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    sweep = Sweep(args.config, axes, seeds, config_overrides(args), args.output_dir)
    sweep.prepare()
    done = sum(r.status == "done" for r in sweep.runs)
    print(
        f"🔬 lorakit sweep: {len(sweep.runs)} runs ({len(sweep.runs) // len(sweep.seeds)} points "
        f"x {len(sweep.seeds)} seeds), {done} already done; chosen on the "
        f"{sweep.selected_on} set; files in {args.output_dir}",
        flush=True,
    )
    table = LiveTable() if sys.stdout.isatty() else LineLog()
    try:
        with table:
            failed = sweep.execute(table.show)
    except KeyboardInterrupt:
        print(f"lorakit sweep: interrupted; rerun the same command to continue {args.output_dir}")
        return 130
    print(f"📊 {args.output_dir / 'sweep.md'}, sweep.csv, sweep.png")
    best = sweep.best_line()
    if best:
        print(best)
    if failed:
        print(
            f"lorakit sweep: error: {failed} run(s) failed; see {args.output_dir / 'logs'} "
            "and rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _search(args: argparse.Namespace) -> int:
    from lorakit.errors import LoraKitError
    from lorakit.extras import require_extra
    from lorakit.search import Search, parse_param

    require_extra("optuna", "--search")
    if args.seeds is not None:
        raise LoraKitError("--search runs one seed per trial: pass --seed, not --seeds")
    search = Search(
        args.config,
        [parse_param(spec) for spec in args.grid],
        config_overrides(args),
        args.output_dir,
        sampler=args.search,
        trials=args.trials,
        storage=args.storage,
        study=args.study,
        pruner=args.pruner,
        heartbeat=args.heartbeat,
        seed=args.sampler_seed,
    )
    search.prepare()
    print(
        f"🔬 lorakit sweep --search {args.search}: {search.trials} trials in study "
        f"{search.study_name!r} ({search.storage_url.split('@')[-1]}), chosen on the "
        f"{search.selected_on} set; files in {args.output_dir}",
        flush=True,
    )
    try:
        failed = search.execute(lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(
            f"lorakit sweep: interrupted; the running trial comes back as a retry that resumes "
            f"its checkpoint: rerun the same command to continue {args.output_dir}"
        )
        return 130
    print(f"📊 {args.output_dir / 'sweep.md'}, sweep.csv, sweep.png, optuna_*.png")
    best = search.best_line()
    if best:
        print(best)
    if failed:
        print(
            f"lorakit sweep: error: {failed} trial(s) failed; see {args.output_dir / 'logs'}",
            file=sys.stderr,
        )
        return 1
    return 0


def _table(sweep: Sweep):  # noqa: ANN202 - a rich Table
    from rich.table import Table

    table = Table(title="lorakit sweep", title_justify="left")
    for column in ("run", "status", sweep.selected_on, "validation", "detail"):
        table.add_column(column)
    for r in sweep.runs:
        metric = r.summary.get("best_metric_name", "accuracy")
        dev = (r.summary.get("best_dev") or {}).get(metric)
        val = (r.summary.get("best_eval") or {}).get(metric)
        chosen = dev if sweep.selected_on == "dev" else val
        style = {"done": "green", "running": "bold yellow", "failed": "red"}.get(r.status, "")
        table.add_row(
            r.name,
            f"[{style}]{r.status}[/]" if style else r.status,
            f"{chosen:.4f}" if chosen is not None else "",
            f"{val:.4f}" if val is not None else "",
            r.detail,
        )
    return table


class LiveTable:
    """The runs as a table redrawn in place (a terminal); no refresh thread, so the runs are
    started from a single-threaded process."""

    def __enter__(self) -> LiveTable:
        from rich.live import Live

        self.live = Live(auto_refresh=False, transient=False)
        self.live.__enter__()
        self.last = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def show(self, sweep: Sweep) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0 or not any(r.status == "running" for r in sweep.runs):
            self.live.update(_table(sweep), refresh=True)
            self.last = now


class LineLog:
    """One line per run that starts or ends (a log file or CI)."""

    def __enter__(self) -> LineLog:
        self.seen: dict[str, str] = {}
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def show(self, sweep: Sweep) -> None:
        done = sum(r.status == "done" for r in sweep.runs)
        for r in sweep.runs:
            if r.status in ("left",) or self.seen.get(r.name) == r.status:
                continue
            self.seen[r.name] = r.status
            if r.status == "running":
                print(f"▶ {r.name} ({done}/{len(sweep.runs)} done)", flush=True)
            elif r.status == "done":
                metric = r.summary.get("best_metric_name", "accuracy")
                chosen = r.summary.get("best_dev") or r.summary.get("best_eval") or {}
                val = (r.summary.get("best_eval") or {}).get(metric)
                print(
                    f"✔ {r.name}: {sweep.selected_on} {metric} {chosen.get(metric, 0.0):.4f}, "
                    f"validation {val if val is None else round(val, 4)}",
                    flush=True,
                )
            elif r.status == "failed":
                print(f"✘ {r.name}: {r.detail}", flush=True)
