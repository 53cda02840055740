"""Run tracking: ``--report_to tensorboard mlflow`` (transformers' spelling), from the loop's
listeners, on the main process only.

Each tracker gets the resolved configuration when the run starts, every metrics.jsonl line as
it is written (``train/loss``, ``eval/accuracy``, ``dev/accuracy``, ... at its optimizer step)
and, at the end, the summary, the training curves and (MLflow) the best adapter:

- tensorboard: event files in ``OUTPUT_DIR/tensorboard`` (``tensorboard --logdir``); the
  config as text, the curves as an image. A resumed run purges the events after its
  checkpoint's step, so the curves show each step once.
- mlflow: a run in the tracking store ``MLFLOW_TRACKING_URI`` names (MLflow's own default:
  ``sqlite:///mlflow.db`` in the working directory, artifacts in ``./mlruns``), experiment
  ``MLFLOW_EXPERIMENT_NAME`` (default ``lorakit``), named after the output directory. The
  config's keys are the run's params; artifacts: config.yaml, summary.json, the curves and
  ``best/``. The run id is kept in ``OUTPUT_DIR/mlflow_run.json`` so ``--resume`` continues
  the same MLflow run; a run stopped by Ctrl-C is ended as KILLED.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import LoraKitError
from lorakit.extras import require_extra

REPORTERS = ("tensorboard", "mlflow")
MLFLOW_RUN_FILE = "mlflow_run.json"


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as ``section/name`` scalars: ``train/loss``, ``eval/f1``, and
    the dev rows' ``dev_*`` keys as ``dev/*``."""
    kind = record.get("kind", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("kind", "step") or isinstance(value, bool):
            continue
        if not isinstance(value, int | float):
            continue
        section, name = ("dev", key[4:]) if key.startswith("dev_") else (kind, key)
        out[f"{section}/{name}"] = float(value)
    return out


def _flat(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", json.dumps(value) if isinstance(value, list) else str(value)


class TensorBoardTracker:
    def __init__(self, out: Path, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "```yaml\n" + text + "```", global_step=resume_step or 0)

    def log(self, record: dict[str, Any], step: int) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def finish(self, out: Path, summary: dict[str, Any], step: int) -> None:
        import matplotlib.image

        curves = out / "training_curves.png"
        if curves.exists():
            image = matplotlib.image.imread(str(curves))[..., :3]
            self.writer.add_image("training_curves", image, step, dataformats="HWC")
        numbers = {k: v for k, v in summary.items() if isinstance(v, int | float)}
        self.writer.add_text("summary", "```json\n" + json.dumps(numbers, indent=1) + "\n```", step)
        self.writer.close()

    def stop(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, out: Path, config: dict[str, Any], resume_step: int | None) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorakit")
        saved = out / MLFLOW_RUN_FILE
        run_id = None
        if resume_step is not None and saved.exists():
            run_id = json.loads(saved.read_text(encoding="utf-8")).get("run_id")
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.resolve().name)
        self.run_id = run.info.run_id
        from lorakit.atomic import write_text

        write_text(saved, json.dumps({"run_id": self.run_id}) + "\n")
        if run_id is None:
            params = dict(_flat(config))
            mlflow.log_params({k: v[:6000] for k, v in params.items()})
            mlflow.log_dict(config, "config.yaml")

    def log(self, record: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics(scalars(record), step=step, run_id=self.run_id)

    def finish(self, out: Path, summary: dict[str, Any], step: int) -> None:
        mlflow = self.mlflow
        for name in ("summary.json", "training_curves.png", "training_log.txt"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name), run_id=self.run_id)
        if (out / "best").is_dir():
            mlflow.log_artifacts(str(out / "best"), artifact_path="best", run_id=self.run_id)
        final = {
            f"summary/{k}": float(v)
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        mlflow.log_metrics(final, step=step, run_id=self.run_id)
        mlflow.end_run()

    def stop(self, status: str) -> None:
        self.mlflow.end_run(status=status)


Tracker = TensorBoardTracker | MlflowTracker


def check_reporters(names: list[str]) -> list[str]:
    """The trackers named by ``--report_to`` (``none`` alone means none), each importable."""
    wanted = [n for n in names if n != "none"]
    unknown = [n for n in wanted if n not in REPORTERS]
    if unknown or ("none" in names and wanted):
        raise LoraKitError(
            f"--report_to takes none, or any of {', '.join(REPORTERS)}; got {' '.join(names)}"
        )
    for name in wanted:
        require_extra(name, f"--report_to {name}")
    return list(dict.fromkeys(wanted))


class Trackers:
    """The run's trackers, fed by the loop's listeners (``Hooks.on_train_log``/``on_eval``)."""

    def __init__(
        self, names: list[str], out: Path, config: dict[str, Any], resume_step: int | None
    ) -> None:
        kinds: dict[str, type[TensorBoardTracker] | type[MlflowTracker]] = {
            "tensorboard": TensorBoardTracker,
            "mlflow": MlflowTracker,
        }
        self.items: list[Tracker] = [kinds[n](out, config, resume_step) for n in names]

    def log(self, record: dict[str, Any], step: int) -> None:
        for tracker in self.items:
            tracker.log(record, step)

    def finish(self, out: Path, summary: dict[str, Any], step: int) -> None:
        for tracker in self.items:
            tracker.finish(out, summary, step)

    def stop(self, status: str = "KILLED") -> None:
        for tracker in self.items:
            tracker.stop(status)
