"""The peer's SST-2 accuracy, measured here: Hugging Face Trainer + PEFT on the full split.

    .venv/bin/python benchmarks/peer_accuracy.py --data_dir ../shared/data

Issue #3 sets lorakit's target from the peer's recipe: the embedded MiniLM, LoRA r=8 on
query/key/value/dense (PEFT defaults otherwise: alpha 8, dropout 0), 3 epochs, batch 32, lr 5e-4,
length-grouped batches, bf16 where the CPU computes it natively (fp32 otherwise). This trains it
on all 67,349 training rows, evaluates the 872 validation rows after every epoch, and prints the
accuracy per epoch, the runtime, examples/s and peak RSS, so the peer is measured beside lorakit
on the same machine instead of quoted. Appends a table to docs/benchmarks-log.md unless --no_docs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

from train_throughput import ROOT, _rss_mb, cpu_name, peft_minilm, publish, sst2_datasets

RECIPE = {"rank": 8, "alpha": 8, "dropout": 0.0, "batch_size": 32, "lr": 5e-4, "max_length": 128}


def run(data_dir: str, epochs: int, seed: int, max_train_samples: int) -> dict:
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from lorakit.runtime import bf16_fast

    tokenizer, train_ds, eval_ds = sst2_datasets(data_dir, max_train_samples, RECIPE["max_length"])
    torch.manual_seed(seed)
    model = peft_minilm(RECIPE["rank"], RECIPE["alpha"], RECIPE["dropout"])
    bf16 = bf16_fast(torch.device("cpu"))

    def accuracy(pred) -> dict:  # noqa: ANN001
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    args = TrainingArguments(
        output_dir=str(ROOT / "runs" / "bench" / "peer_accuracy"),
        per_device_train_batch_size=RECIPE["batch_size"],
        per_device_eval_batch_size=64,
        learning_rate=RECIPE["lr"],
        num_train_epochs=epochs,
        save_strategy="no",
        eval_strategy="epoch",
        report_to=[],
        logging_steps=200,
        seed=seed,
        use_cpu=True,
        bf16=bf16,
        train_sampling_strategy="group_by_length",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    start = time.perf_counter()
    out = trainer.train()
    evals = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h]
    return {
        "epoch_accuracy": evals,
        "train_runtime_s": round(out.metrics["train_runtime"], 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "examples_per_sec": round(out.metrics["train_samples_per_second"], 1),
        "peak_rss_mb": round(_rss_mb()),
        "precision": "bf16" if bf16 else "fp32",
        "train_rows": len(train_ds),
    }


def table(result: dict, args: argparse.Namespace) -> str:
    command = f".venv/bin/python benchmarks/peer_accuracy.py --data_dir {args.data_dir}"
    for flag, default in (("epochs", 3), ("seed", 42), ("max_train_samples", 0)):
        if getattr(args, flag) != default:
            command += f" --{flag} {getattr(args, flag)}"
    epochs = " / ".join(f"{a:.2%}" for a in result["epoch_accuracy"])
    return "\n".join(
        [
            f"### Peer accuracy: Trainer + PEFT on full SST-2, {datetime.date.today()}",
            "",
            f"Command: `{command}`  ",
            f"Machine: {cpu_name()}, {result['precision']}.  ",
            f"Recipe (issue #3's peer): embedded MiniLM, PEFT LoRA r={RECIPE['rank']} "
            f"alpha={RECIPE['alpha']} dropout={RECIPE['dropout']} on query/key/value/dense, "
            f"{args.epochs} epochs, batch {RECIPE['batch_size']}, lr {RECIPE['lr']}, "
            f"group_by_length, seed {args.seed}, {result['train_rows']:,} training rows.",
            "",
            "| val. accuracy per epoch | train runtime | examples/s | peak RSS MB |",
            "|---|---:|---:|---:|",
            f"| {epochs} | {result['train_runtime_s'] / 60:.1f} min | "
            f"{result['examples_per_sec']:.1f} | {result['peak_rss_mb']} |",
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_train_samples", type=int, default=0, help="0 = all rows")
    p.add_argument("--no_docs", action="store_true", help="print only")
    args = p.parse_args()
    result = run(args.data_dir, args.epochs, args.seed, args.max_train_samples)
    print("RESULT " + json.dumps(result), flush=True)
    publish(table(result, args), args.no_docs)


if __name__ == "__main__":
    main()
