"""lorakit sweep --search: Optuna studies shared by workers (SQLite and a real PostgreSQL
server), pruning, a killed worker's trial retried from its checkpoint, and bad input."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import save_tiny_model_dir, write_sentiment_rows

from lorakit.cli import main

optuna = pytest.importorskip("optuna")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search")
    data = root / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 96, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 16, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "data": data}


def _flags(env: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        *["sweep", "--model", str(env["model"]), "--data_dir", str(env["data"])],
        *["--output_dir", str(out), "--dev_split", "16", "--batch_size", "8"],
        *["--num_epochs", "1", "--precision", "fp32", "--eval_steps", "2"],
        *extra,
    ]


def _worker(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "PYTHONPATH": str(SRC), "LORAKIT_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorakit", *args]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=environment)


def _two_workers(args: list[str], tmp_path: Path) -> list[str]:
    workers = [_worker(args, tmp_path / f"worker{i}.log") for i in range(2)]
    codes = [w.wait(timeout=600) for w in workers]
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    return logs


def _study(storage: str, name: str):  # noqa: ANN202 - an optuna Study
    return optuna.load_study(study_name=name, storage=storage)


def test_two_workers_share_one_sqlite_study_and_run_n_trials_none_twice(
    env: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    space = ["--grid", "learning_rate=1e-3..2e-2:log", "--grid", "alpha=2,4,8"]
    args = _flags(env, out, "--search", "tpe", "--trials", "4", *space, "--heartbeat", "2")
    logs = _two_workers(args, tmp_path)
    study = _study(f"sqlite:///{out.resolve() / 'study.db'}", out.name)
    trials = study.get_trials()
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(trials) == len(finished) == 4
    runs = [t.user_attrs["run"] for t in trials]
    assert sorted(runs) == [f"trial-{i:03d}" for i in range(4)]
    started = [line for log in logs for line in log.splitlines() if line.startswith("▶ trial")]
    assert len(started) == 4 and all(log.count("▶ trial") >= 1 for log in logs)  # both worked
    assert len({line.split()[2] for line in started}) == 4  # each trial once
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("trial,run,state,learning_rate,alpha")
    for name in ("sweep.md", "sweep.png", "optuna_history.png"):
        assert (out / name).stat().st_size > 0


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own (Debian's postgresql) on a free port, data in /tmp."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = found[-1] if found else (Path(shutil.which("initdb") or "/nonexistent"))
    if not initdb.exists():
        pytest.skip("no PostgreSQL server here (scripts/postgres.sh installs Debian's)")
    psycopg = pytest.importorskip("psycopg")

    root = Path(tempfile.mkdtemp(prefix="lorakit-pg-"))
    as_postgres: list[str] = []
    if os.getuid() == 0:  # initdb and postgres refuse to run as root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(
        [*as_postgres, str(initdb), "-D", str(data), "-U", "lorakit", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    pg_ctl = [*as_postgres, str(initdb.parent / "pg_ctl"), "-D", str(data)]
    options = f"-p {port} -h 127.0.0.1 -k {root}"
    log = root / "server.log"
    subprocess.run(
        [*pg_ctl, "-o", options, "-l", str(log), "-w", "start"], check=True, capture_output=True
    )
    try:
        conn = psycopg.connect(
            host="127.0.0.1", port=port, user="lorakit", dbname="postgres", autocommit=True
        )
        conn.execute("CREATE DATABASE studies")
        conn.close()
        yield f"postgresql://lorakit@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgresql_grid_study_and_run_each_point_once(
    env: dict[str, Path], tmp_path: Path, postgres: str
) -> None:
    out = tmp_path / "sweep"
    space = ["--grid", "alpha=2,8", "--grid", "learning_rate=3e-3,1e-2"]
    flags = ["--search", "grid", "--storage", postgres, "--study", "pg", "--pruner", "none"]
    _two_workers(_flags(env, out, *flags, *space, "--heartbeat", "2"), tmp_path)
    trials = _study(postgres, "pg").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # the grid's size, no --trials
    points = {(t.params["lora.alpha"], t.params["training.learning_rate"]) for t in trials}
    assert len(points) == 4  # every point, none twice
    assert all((out / "runs" / t.user_attrs["run"] / "summary.json").exists() for t in trials)


def test_pruning_stops_a_trial_whose_dev_score_is_hopeless(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    # Two that learn for 2 epochs, then one that cannot, planned for 40: it is judged against
    # the others' first 10 evaluations, and its 200 give the judgement time to reach it on a
    # loaded machine (the worker reads the evaluations twice a second; a tiny one takes less).
    for lr, epochs in ((1e-2, "2"), (8e-3, "2"), (1e-7, "40")):  # choices as spelled
        study.enqueue_trial({"training.learning_rate": lr, "training.num_epochs": epochs})
    space = ["--grid", "learning_rate=1e-7..2e-2:log", "--grid", "num_epochs=2,40"]
    flags = ["--search", "random", "--trials", "3", "--storage", storage, "--study", "prune"]
    args = _flags(env, out, *flags, *space)
    del args[args.index("--num_epochs") : args.index("--num_epochs") + 2]  # the grid sets it
    assert main(args) == 0
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert "✂ trial 2 pruned at step" in capsys.readouterr().out
    evals = [
        (out / "runs" / t.user_attrs["run"] / "metrics.jsonl").read_text().count('"eval"')
        for t in trials
    ]
    assert evals[0] == evals[1] == 10  # 80 rows, batch 8, an evaluation every 2 steps
    assert evals[2] < 40 * 5  # it stopped early; its process exited cleanly
    assert max(trials[2].intermediate_values) <= 20  # judged on the steps the others reached
    assert (out / "runs" / trials[2].user_attrs["run"] / "checkpoint").is_dir()
    assert "pruned" in (out / "sweep.md").read_text()


def test_a_killed_workers_trial_is_retried_from_its_checkpoint(
    env: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    flags = ["--search", "random", "--trials", "2", "--grid", "alpha=4,8", "--heartbeat", "1"]
    # 8 epochs (80 steps): time enough between its first checkpoint and its end for the kill
    args = _flags(env, out, *flags, "--pruner", "none", "--num_epochs", "8")
    first = _worker(args, tmp_path / "killed.log")
    checkpoint = out / "runs" / "trial-000" / "checkpoint"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.is_dir(), (tmp_path / "killed.log").read_text()
    first.kill()  # no goodbye: its trial stays RUNNING until its heartbeat is stale
    first.wait()
    second = _worker(args, tmp_path / "second.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()
    study = _study(f"sqlite:///{out.resolve() / 'study.db'}", out.name)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[0] == "FAIL"  # marked failed, then retried: not lost
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 2 and "trial-000" in {t.user_attrs["run"] for t in done}
    log = (out / "logs" / "trial-000.log").read_text()
    assert "Resum" in log or "resum" in log  # the retry continued the checkpoint
    assert (out / "runs" / "trial-000" / "summary.json").exists()


def test_sigterm_gives_the_running_trial_back_and_the_rerun_resumes_it(
    env: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    flags = ["--search", "grid", "--grid", "alpha=4,8", "--pruner", "none", "--num_epochs", "8"]
    args = _flags(env, out, *flags)
    worker = _worker(args, tmp_path / "first.log")
    checkpoint = out / "runs" / "trial-000" / "checkpoint"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.terminate()
    assert worker.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()
    assert "comes back as a retry" in (tmp_path / "first.log").read_text()
    study = _study(f"sqlite:///{out.resolve() / 'study.db'}", out.name)
    states = [(t.state.name, t.system_attrs.get("failed_trial")) for t in study.get_trials()]
    assert states[0] == ("FAIL", None) and ("WAITING", 0) in states
    rerun = _worker(args, tmp_path / "rerun.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["run"] for t in done) == ["trial-000", "trial-001"]
    assert "↻ Resumed from checkpoint" in (out / "logs" / "trial-000.log").read_text()


def test_a_grid_with_fewer_trials_than_points_runs_a_sample_of_them(
    env: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    args = _flags(env, out, "--search", "grid", "--grid", "alpha=2,4,8", "--trials", "1")
    assert main(args) == 0
    trials = _study(f"sqlite:///{out.resolve() / 'study.db'}", out.name).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"]
    assert trials[0].params["lora.alpha"] in ("2", "4", "8")


def test_trials_the_config_refuses_fail_and_use_up_their_place(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    args = _flags(env, out, "--search", "random", "--trials", "2", "--grid", "dropout=1.0..2.0")
    assert main(args) == 1  # finishes (no endless retries), says the trials failed
    captured = capsys.readouterr()
    assert "2 trial(s) failed" in captured.err
    assert captured.out.count("lora.dropout must be in [0, 1)") == 2
    study = _study(f"sqlite:///{out.resolve() / 'study.db'}", out.name)
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "FAIL"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--search", "tpe", "--trials", "2", "--grid", "rank=4,0"], "--grid rank=0: lora.rank"),
        (["--search", "tpe", "--grid", "rank=2,4"], "needs --trials"),
        (["--trials", "3", "--grid", "rank=2,4"], "--trials belongs to a search"),
        (["--search", "grid", "--grid", "learning_rate=1e-4..1e-2"], "not LOW..HIGH"),
        (["--search", "tpe", "--trials", "2", "--grid", "learning_rate=1e-2..1e-4"], "LOW < HIGH"),
        (["--search", "tpe", "--trials", "2", "--grid", "learning_rate=0..1:log"], "LOW > 0"),
        (["--search", "tpe", "--trials", "2"], "needs a space"),
        (
            ["--search", "tpe", "--trials", "2", "--grid", "rank=2,4", "--storage", "nosuch://x"],
            "--storage nosuch://x",
        ),
    ],
)
def test_bad_searches_are_one_line_errors(
    env: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "sweep"
    assert main(_flags(env, out, *extra)) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
