"""``lorakit train``: config file + flag overrides -> ``train``; optional push to the Hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.commands.flags import add_config_flags, config_overrides

HELP = "fine-tune a model with LoRA (flags override the --config file)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file shaped like configs/*.yaml")
    add_config_flags(parser)


def run(args: argparse.Namespace) -> int:
    from lorakit.adapter import read_adapter_config
    from lorakit.config import TrainingSettings, load_config
    from lorakit.distributed import is_main
    from lorakit.hub import model_card, push_adapter
    from lorakit.train import Interrupted, train

    overrides = config_overrides(args)
    path = args.config
    if overrides.get("training.resume") and path is None:
        # Resume with the run's own resolved configuration unless told otherwise.
        out = Path(overrides.get("training.output_dir", TrainingSettings().output_dir))
        path = out / "config.yaml"
    config = load_config(path, overrides)
    try:
        summary = train(config)
    except Interrupted as e:
        if is_main():
            print(f"lorakit train: {e}")
        return 130
    if not is_main():  # under torchrun, rank 0 alone pushes and prints
        return 0
    t = config.training
    if t.push_to_hub:
        best = Path(t.output_dir) / "best"
        card = model_card(read_adapter_config(best), summary, t.hub_model_id)
        url = push_adapter(best, t.hub_model_id, t.hub_private, card)
        print(f"🤗 Pushed the best adapter to {url}")
    print(
        json.dumps(
            {k: summary[k] for k in ("best_eval_accuracy", "best_epoch", "train_examples_per_sec")}
        )
    )
    return 0
