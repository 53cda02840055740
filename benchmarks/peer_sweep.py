"""The peer's side of docs/results.md: Trainer + PEFT, tuned with the same budget as lorakit.

    .venv/bin/python benchmarks/peer_sweep.py --data_dir ../shared/data \
        --learning_rates 5e-4,1e-3,2e-3 --seeds 0 --max_train_samples 8000 --epochs 1 \
        --dev_split 2000 --eval_steps 125 --out benchmarks/results/peer_sweep.json

The recipe is ``--config``'s (default configs/sst2_minilm.yaml: PEFT LoRA alpha=8 dropout 0
on query/key/value/dense; batch 32, warmup 0.06, weight decay 0, max length 128), with rank
``--rank`` (8 as in the searches; the MiniLM config ships 32 since 2026-11-30), length-grouped
batches, fp32 unless bf16 is native. The config's target names are spelled for its model as
lorakit spells them (MPNet's ``query value`` are ``q v``; configs/sst2_mpnet.yaml). The
data split is lorakit's: the same ``dev_split`` rows are held out of training
(``lorakit.data.hold_out``), and each run's checkpoint is the evaluation with the best dev
accuracy, as lorakit's ``best/``. Every learning rate and seed is one run; the JSON holds each
run's dev and validation accuracy at that checkpoint, and the markdown table printed at the end
is mean ± std over seeds per learning rate, ranked on dev.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from train_throughput import ROOT, _rss_mb, cpu_name


def recipe(path: Path) -> dict:
    """The lorakit config's model and recipe, for the peer."""
    from lorakit.config import load_config

    config = load_config(path)
    return {
        "model": config.model_name,
        "alpha": config.lora.alpha,
        "dropout": config.lora.dropout,
        "target_modules": config.lora.target_modules,
        "batch_size": config.training.batch_size,
        "warmup_ratio": config.training.warmup_ratio,
        "weight_decay": config.training.weight_decay,
    }


def peft_model(recipe: dict, rank: int, adalora: dict | None = None):  # noqa: ANN201
    """The recipe's base model wrapped by PEFT's LoRA (or, given ``adalora``'s schedule,
    AdaLoRA with ``rank`` as init_r) on the layers lorakit would wrap."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from lorakit.inject import resolve_targets
    from lorakit.models import load_model

    model = load_model(recipe["model"], {0: "negative", 1: "positive"})
    common = {
        "task_type": "SEQ_CLS",
        "lora_alpha": recipe["alpha"],
        "lora_dropout": recipe["dropout"],
        "target_modules": resolve_targets(model, recipe["target_modules"]),
    }
    if adalora:
        return get_peft_model(model, AdaLoraConfig(init_r=rank, **adalora, **common))
    return get_peft_model(model, LoraConfig(r=rank, **common))


def adalora_callback():  # noqa: ANN201
    """PEFT's AdaLoRA step: update_and_allocate after the optimizer, before zero_grad."""
    from transformers import TrainerCallback

    class Allocate(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            model.base_model.update_and_allocate(state.global_step + 1)

    return Allocate()


def datasets(
    model: str, data_dir: str, dev_split: float, max_train_samples: int, max_length: int
) -> tuple:
    from datasets import Dataset

    from lorakit.config import DataSettings
    from lorakit.data import hold_out, load_examples, read_file
    from lorakit.models import load_tokenizer

    settings = DataSettings(subset="sst2", data_dir=data_dir)
    tokenizer = load_tokenizer(model)
    train, dev = hold_out(load_examples(settings, "train"), dev_split)
    train = train.head(max_train_samples)

    def dataset(ex) -> Dataset:  # noqa: ANN001
        enc = tokenizer([t[0] for t in ex.texts], truncation=True, max_length=max_length)
        return Dataset.from_dict({**enc, "labels": ex.labels})

    evals = {"dev": dataset(dev), "validation": dataset(load_examples(settings, "validation"))}
    # Out of domain: short product, movie and restaurant reviews (../shared/data/reviews).
    for path in sorted((Path(data_dir) / "reviews").glob("*.tsv")):
        reviews = read_file(path, ["sentence"], "label", ("negative", "positive"))
        evals[path.stem] = dataset(reviews)
    return tokenizer, dataset(train), evals


def run(args: argparse.Namespace, lr: float, seed: int, data: tuple) -> dict:
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from lorakit.runtime import bf16_fast

    tokenizer, train_ds, eval_sets = data
    torch.manual_seed(seed)
    steps = math.ceil(len(train_ds) / args.recipe["batch_size"]) * math.ceil(args.epochs)
    adalora = (
        {"target_r": args.target_r, "tinit": args.tinit, "tfinal": args.tfinal,
         "deltaT": args.deltaT, "total_step": steps}
        if args.variant == "adalora"
        else None
    )  # fmt: skip
    model = peft_model(args.recipe, args.rank, adalora)
    bf16 = bf16_fast(torch.device("cpu"))

    def accuracy(pred) -> dict:  # noqa: ANN001
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    class StepClock(TrainerCallback):
        """Seconds spent in optimizer steps only (no evaluation, no saving), as lorakit's
        train_step_seconds, so the two rates compare."""

        seconds = 0.0
        steps = 0
        _start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.seconds += time.perf_counter() - self._start
            self.steps += 1

    clock = StepClock()
    # Each run checkpoints into its own folder, so a killed run resumes where it stopped (a
    # full-length MPNet run outlasts a session on 2 cores); the folder goes once it finishes.
    tag = f"{Path(args.recipe['model']).name}-{args.variant}-r{args.rank}-lr{lr:g}-seed{seed}"
    run_dir = ROOT / "runs" / "bench" / "peer_sweep" / tag
    targs = TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=args.recipe["batch_size"],
        per_device_eval_batch_size=64,
        learning_rate=lr,
        warmup_steps=args.recipe["warmup_ratio"],  # transformers 5: a float < 1 is a ratio
        weight_decay=args.recipe["weight_decay"],
        num_train_epochs=args.epochs,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        eval_strategy="steps" if args.eval_steps else "epoch",
        eval_steps=args.eval_steps or None,
        report_to=[],
        logging_steps=200,
        seed=seed,
        use_cpu=True,
        bf16=bf16,
        train_sampling_strategy="group_by_length",
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_sets,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[clock, adalora_callback()] if adalora else [clock],
    )
    from transformers.trainer_utils import get_last_checkpoint

    resume = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if resume:
        print(f"resuming {tag} from {Path(resume).name}", flush=True)
    first_step = int(Path(resume).name.rpartition("-")[2]) if resume else 0
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start
    # Trainer's own rate counts the steps a resumed run skipped; count what this process ran.
    trained = (trainer.state.global_step - first_step) * args.recipe["batch_size"]
    if args.eval_steps and trainer.state.global_step % args.eval_steps:
        trainer.evaluate()  # the end of training, as lorakit evaluates it
    by_step: dict[int, dict] = {}
    for h in trainer.state.log_history:
        for name in eval_sets:
            if f"eval_{name}_accuracy" in h:
                by_step.setdefault(h["step"], {"step": h["step"]})[name] = h[
                    f"eval_{name}_accuracy"
                ]
    shutil.rmtree(run_dir, ignore_errors=True)
    evals = [by_step[k] for k in sorted(by_step)]
    best = max(evals, key=lambda e: (e["dev"], -e["step"]))  # the first best, as lorakit
    return {
        "model": args.recipe["model"],
        "variant": args.variant,
        "rank": args.rank,
        "learning_rate": lr,
        "seed": seed,
        "evals": evals,
        "best_step": best["step"],
        "dev_accuracy": best["dev"],
        "validation_accuracy": best["validation"],
        "out_of_domain": {k: v for k, v in best.items() if k not in ("step", "dev", "validation")},
        "final_validation_accuracy": evals[-1]["validation"],
        "train_runtime_s": round(out.metrics["train_runtime"], 1),
        "wall_s": round(wall, 1),
        "examples_per_sec": round(
            trained / out.metrics["train_runtime"]
            if resume
            else out.metrics["train_samples_per_second"],
            1,
        ),
        "train_step_seconds": round(clock.seconds, 1),
        "step_examples_per_sec": round(clock.steps * args.recipe["batch_size"] / clock.seconds, 2),
        "resumed_from_step": first_step,
        "peak_rss_mb": round(_rss_mb()),
        "precision": "bf16" if bf16 else "fp32",
        "train_rows": len(train_ds),
    }


def table(runs: list[dict]) -> str:
    from lorakit.sweep import mean_std

    groups: dict[tuple[int, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r.get("rank", 8), r["learning_rate"]), []).append(r)

    def ms(values: list[float]) -> str:
        return mean_std([100 * v for v in values])

    rows = sorted(groups.items(), key=lambda kv: -statistics.mean(r["dev_accuracy"] for r in kv[1]))
    lines = [
        "| # | LoRA rank | learning rate | seeds | dev accuracy | validation accuracy "
        "| examples/s | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, ((rank, lr), group) in enumerate(rows, 1):
        lines.append(
            f"| {i} | {rank} | {lr:g} | {len(group)} | {ms([r['dev_accuracy'] for r in group])} | "
            f"{ms([r['validation_accuracy'] for r in group])} | "
            f"{statistics.mean(r['examples_per_sec'] for r in group):.1f} | "
            f"{statistics.mean(r['train_runtime_s'] for r in group):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "sst2_minilm.yaml")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha: the config's)")
    p.add_argument("--variant", choices=["lora", "adalora"], default="lora")
    p.add_argument("--target_r", type=int, default=8, help="adalora: as lorakit's --target_r")
    p.add_argument("--tinit", type=int, default=0)
    p.add_argument("--tfinal", type=int, default=0)
    p.add_argument("--deltaT", type=int, default=1)  # noqa: N815
    p.add_argument("--learning_rates", default="5e-4,1e-3,2e-3")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--max_train_samples", type=int, default=8000, help="0 = all rows")
    p.add_argument("--dev_split", type=float, default=2000)
    p.add_argument("--eval_steps", type=int, default=0, help="0 = once per epoch")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--save_steps", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peer_sweep.json")
    args = p.parse_args()
    args.recipe = recipe(args.config)
    data = datasets(
        args.recipe["model"], args.data_dir, args.dev_split, args.max_train_samples, args.max_length
    )
    done = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    key = lambda r: (r.get("rank", 8), r["learning_rate"], r["seed"])  # noqa: E731
    finished = {key(r) for r in done}
    for lr in (float(v) for v in args.learning_rates.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            if (args.rank, lr, seed) in finished:
                continue  # resumable: a rerun skips finished runs
            result = run(args, lr, seed, data)
            print(json.dumps({k: v for k, v in result.items() if k != "evals"}), flush=True)
            done.append(result)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps(
                    {
                        "machine": cpu_name(),
                        "date": datetime.date.today().isoformat(),
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "runs": done,
                    },
                    indent=1,
                )
                + "\n"
            )
    print(table(done))


if __name__ == "__main__":
    main()
