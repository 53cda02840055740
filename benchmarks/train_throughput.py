"""Training throughput, side by side: Hugging Face Trainer + PEFT (defaults, tuned) vs lorakit.

    .venv/bin/python benchmarks/train_throughput.py --data_dir ../shared/data --samples 4096

Each variant trains the embedded MiniLM with LoRA r=8 on query/key/value/dense, batch 32,
lr 5e-4, on the same first ``--samples`` SST-2 training rows, in its own process (so peak RSS
is its own), then evaluates on the full validation split. Steady-state examples/s excludes
model loading and the first optimizer steps. Prints a markdown table and appends it to
docs/benchmarks-log.md with the command and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 5
VARIANTS = {
    "trainer_peft_default": "Trainer + PEFT, defaults (random batches, fp32)",
    "trainer_peft_tuned": "Trainer + PEFT, tuned (group_by_length, bf16 where fast)",
    "lorakit": "lorakit, defaults",
}
# The shipped recipe (configs/sst2_minilm.yaml) for both sides.
HYPER = {"rank": 8, "alpha": 8, "dropout": 0.0, "batch_size": 32, "lr": 1e-3, "max_length": 128}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_lorakit(data_dir: str, samples: int, out: Path) -> dict:
    from lorakit.config import load_config
    from lorakit.train import train

    config = load_config(
        ROOT / "configs" / "sst2_minilm.yaml",
        {
            "data.data_dir": data_dir,
            "training.output_dir": str(out),
            "training.overwrite": True,
            "training.max_train_samples": samples,
            "training.num_epochs": 1,
            "training.batch_size": HYPER["batch_size"],
            "training.learning_rate": HYPER["lr"],
            "lora.rank": HYPER["rank"],
            "lora.alpha": float(HYPER["alpha"]),
            "lora.dropout": HYPER["dropout"],
            "training.logging_steps": 10,
        },
    )
    summary = train(config)
    return {
        "examples_per_sec": summary["train_examples_per_sec"],
        "accuracy": summary["final_eval"]["accuracy"],
        "peak_rss_mb": _rss_mb(),
        "precision": summary["precision"],
    }


def sst2_datasets(data_dir: str, train_rows: int, max_length: int) -> tuple:
    """The MiniLM tokenizer and tokenized SST-2 train (first ``train_rows``, 0 = all) and
    validation splits, as ``datasets.Dataset`` for the Trainer peers."""
    from datasets import Dataset

    from lorakit.config import DataSettings
    from lorakit.data import load_examples
    from lorakit.models import load_tokenizer

    settings = DataSettings(subset="sst2", data_dir=data_dir)
    tokenizer = load_tokenizer("minilm")

    def dataset(split: str, n: int) -> Dataset:
        ex = load_examples(settings, split).head(n)  # type: ignore[arg-type]
        enc = tokenizer([t[0] for t in ex.texts], truncation=True, max_length=max_length)
        return Dataset.from_dict({**enc, "labels": ex.labels})

    return tokenizer, dataset("train", train_rows), dataset("validation", 0)


def peft_minilm(rank: int, alpha: float, dropout: float):  # noqa: ANN201
    """The embedded MiniLM wrapped by PEFT's LoRA on query/key/value/dense (the peers' model)."""
    from peft import LoraConfig, get_peft_model

    from lorakit.models import load_model

    return get_peft_model(
        load_model("minilm", {0: "negative", 1: "positive"}),
        LoraConfig(
            task_type="SEQ_CLS",
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=["query", "key", "value", "dense"],
        ),
    )


def run_trainer(data_dir: str, samples: int, out: Path, tuned: bool) -> dict:
    import numpy as np
    import torch
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lorakit.runtime import bf16_fast

    torch.manual_seed(42)
    tokenizer, train_ds, eval_ds = sst2_datasets(data_dir, samples, HYPER["max_length"])
    model = peft_minilm(HYPER["rank"], HYPER["alpha"], HYPER["dropout"])

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.marks.append(time.perf_counter())

    clock = Clock()
    # The tuned peer runs the precision lorakit's --precision auto picks for training here.
    bf16 = tuned and bf16_fast(torch.device("cpu"))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=HYPER["batch_size"],
        per_device_eval_batch_size=64,
        learning_rate=HYPER["lr"],
        warmup_steps=0.06,  # a ratio: the shipped recipe's warmup, as lorakit runs it
        weight_decay=0.0,
        num_train_epochs=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=50,
        seed=42,
        use_cpu=True,
        bf16=bf16,
        train_sampling_strategy="group_by_length" if tuned else "random",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[clock],
    )
    trainer.train()
    marks = clock.marks[WARMUP_STEPS:]
    steps = len(marks) - 1
    examples_per_sec = steps * HYPER["batch_size"] / (marks[-1] - marks[0])
    logits = trainer.predict(eval_ds).predictions
    accuracy = float((np.argmax(logits, -1) == np.asarray(eval_ds["labels"])).mean())
    return {
        "examples_per_sec": round(examples_per_sec, 2),
        "accuracy": accuracy,
        "peak_rss_mb": _rss_mb(),
        "precision": "bf16" if bf16 else "fp32",
    }


def child(variant: str, data_dir: str, samples: int) -> None:
    out = ROOT / "runs" / "bench" / variant
    if variant == "lorakit":
        result = run_lorakit(data_dir, samples, out)
    else:
        result = run_trainer(data_dir, samples, out, tuned=variant == "trainer_peft_tuned")
    print("RESULT " + json.dumps(result))


def parent(args: argparse.Namespace) -> None:
    rows = {}
    for variant in args.variants:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--data_dir",
                args.data_dir,
                "--samples",
                str(args.samples),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(lines[-1][7:])
        print(variant, rows[variant], flush=True)
    print_table(rows, args)


def print_table(rows: dict, args: argparse.Namespace) -> None:
    base = rows.get("trainer_peft_tuned") or next(iter(rows.values()))
    lines = [
        f"### Training throughput, {datetime.date.today()}",
        "",
        f"Command: `.venv/bin/python benchmarks/train_throughput.py --data_dir {args.data_dir} "
        f"--samples {args.samples}`  ",
        f"Machine: {cpu_name()}, {platform.machine()}, torch threads as default.  ",
        f"Setup: embedded MiniLM, SST-2 first {args.samples} training rows, 1 epoch, LoRA "
        f"r={HYPER['rank']} alpha={HYPER['alpha']} dropout={HYPER['dropout']} on "
        f"query/key/value/dense, batch {HYPER['batch_size']}, lr {HYPER['lr']}; accuracy on "
        "the 872 validation rows.",
        "",
        "| variant | examples/s (steady) | vs tuned Trainer+PEFT | val. accuracy | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for variant, r in rows.items():
        lines.append(
            f"| {VARIANTS[variant]} | {r['examples_per_sec']:.1f} | "
            f"{r['examples_per_sec'] / base['examples_per_sec']:.2f}x | {r['accuracy']:.4f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    publish("\n".join(lines) + "\n", args.no_docs)


def publish(text: str, print_only: bool) -> None:
    """Print a benchmark's markdown and append it to docs/benchmarks-log.md."""
    print(text)
    if not print_only:
        with (ROOT / "docs" / "benchmarks-log.md").open("a") as f:
            f.write("\n" + text)


# The flags that decide what bf16 costs here (native with AMX or AVX512-BF16, emulated without).
BF16_FLAGS = ("avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_name() -> str:
    """The CPU, its cores and its bf16 flags, as every benchmark record names the machine."""
    cores = len(os.sched_getaffinity(0))
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first core's lines
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor()
    flags = set(fields.get("flags", "").split())
    have = " ".join(f for f in BF16_FLAGS if f in flags) or "no " + "/".join(BF16_FLAGS)
    return f"{name} ({cores} cores; {have})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no_docs", action="store_true", help="print only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.data_dir, args.samples)
    else:
        parent(args)


if __name__ == "__main__":
    main()
