"""--report_to: TensorBoard event files and MLflow runs, read back with their own readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import interrupt_at, save_tiny_model_dir, write_sentiment_rows

from lorakit.cli import main

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tracking")
    data = root / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 48, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 16, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "data": data}


def _args(env: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        *["train", "--model", str(env["model"]), "--data_dir", str(env["data"])],
        *["--output_dir", str(out), "--batch_size", "8", "--num_epochs", "2"],
        *["--rank", "4", "--precision", "fp32", "--logging_steps", "2", "--dev_split", "8"],
        *extra,
    ]


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lorakit-test")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go to ./mlruns
    return uri


def test_tensorboard_gets_every_metrics_line_the_config_and_the_curves(
    env: dict[str, Path], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_args(env, out, "--report_to", "tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    train, evals = _records(out, "train"), _records(out, "eval")
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert got == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    got = [(e.step, e.value) for e in events.Scalars("eval/accuracy")]
    assert got == [(r["step"], pytest.approx(r["accuracy"])) for r in evals]
    dev = [e.value for e in events.Scalars("dev/accuracy")]
    assert dev == [pytest.approx(r["dev_accuracy"]) for r in evals]
    assert "train/learning_rate" in tags["scalars"] and "training_curves" in tags["images"]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "rank: 4" in config and "tensorboard" in config


def test_mlflow_run_has_params_metrics_and_the_adapter_and_resume_continues_it(
    env: dict[str, Path], tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 6)  # mid epoch 2 (5 steps an epoch)
        assert main(_args(env, out, "--report_to", "mlflow")) == 130
    runs = mlflow.search_runs(experiment_names=["lorakit-test"])
    assert len(runs) == 1 and runs.loc[0, "status"] == "KILLED"
    assert main(_args(env, out, "--report_to", "mlflow", "--resume")) == 0

    runs = mlflow.search_runs(experiment_names=["lorakit-test"])
    assert len(runs) == 1  # the resumed run is the same MLflow run
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == "run"
    assert run["params.lora.rank"] == "4" and run["params.training.batch_size"] == "8"
    evals = _records(out, "eval")
    assert run["metrics.eval/accuracy"] == pytest.approx(evals[-1]["accuracy"])
    summary = json.loads((out / "summary.json").read_text())
    assert run["metrics.summary/best_metric"] == pytest.approx(summary["best_metric"])
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run["run_id"], "train/loss")
    # Each logged step once, in order, across the interruption (resume replays none twice).
    assert [h.step for h in history] == [r["step"] for r in _records(out, "train")]
    names = {a.path for a in client.list_artifacts(run["run_id"], "best")}
    assert "best/adapter_model.safetensors" in names and "best/adapter_config.json" in names
    top = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"summary.json", "training_curves.png", "config.yaml"} <= top


@pytest.mark.parametrize("bad", [["wandb"], ["none", "mlflow"]])
def test_unknown_trackers_are_a_one_line_error(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: list[str]
) -> None:
    out = tmp_path / "run"
    assert main(_args(env, out, "--report_to", *bad)) != 0
    err = capsys.readouterr().err.strip()
    assert "report_to" in err and len(err.splitlines()) == 1 and not out.exists()
