"""Mean pooling against BERT's [CLS] pooler, at the short budget of docs/results.md.

    .venv/bin/python benchmarks/pooling.py --data_dir ../shared/data

all-MiniLM-L6-v2 was trained as a sentence encoder with mean pooling: the average of the last
hidden states over the real tokens. ``BertForSequenceClassification``, which lorakit trains
(and PEFT and plain transformers load), classifies from its pooler instead: ``tanh(W h_CLS +
b)``, whose weights this checkpoint never trained for any task. This measures what that choice
costs. Each run is ``lorakit.train.train`` with the short budget's config (8,000 training
rows, one epoch, 2,000 held-out dev rows choose the checkpoint, validation only reported);
for the "mean" runs the model's pooler is replaced, in memory, by a masked mean over the
tokens feeding the classifier directly. The adapters those runs save still describe a
[CLS]-pooled model, so they are scratch: this is a measurement, not a shipped option.
Writes ``--out`` (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# (name, method, learning rate, pooling): the head and LoRA rows of results.md sections 1 and 4
RUNS = [
    ("head only", "head", 1e-2, "cls"),
    ("head only", "head", 1e-2, "mean"),
    ("LoRA r=8, all linear", "lora", 1e-3, "cls"),
    ("LoRA r=8, all linear", "lora", 1e-3, "mean"),
    ("LoRA r=8, all linear", "lora", 2e-3, "cls"),
    ("LoRA r=8, all linear", "lora", 2e-3, "mean"),
]


class MeanPooler(nn.Module):
    """Masked mean of the last hidden states; the mask comes from the encoder's own call."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(dim=1)
        m = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: Any) -> None:
    """Swap the BERT encoder's pooler for ``MeanPooler``, fed the batch's attention mask."""
    encoder = model.base_model
    pooler = MeanPooler()
    encoder.pooler = pooler

    def keep_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pooler.mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)


def run(args: argparse.Namespace, method: str, lr: float, pooling: str, out: Path) -> dict:
    import lorakit.train as lk_train
    from lorakit.config import load_config

    config = load_config(
        ROOT / "configs" / "sst2_minilm.yaml",
        {
            "data.data_dir": args.data_dir,
            "method": method,
            "lora.rank": 8,  # the short budget's searches ran at r=8 (docs/results.md)
            "training.learning_rate": lr,
            "training.dev_split": 2000,
            "training.max_train_samples": 8000,
            "training.num_epochs": 1,
            "training.eval_steps": 125,
            "training.seed": args.seed,
            "training.output_dir": str(out),
        },
    )
    build = lk_train.build_model

    def build_model(*a: Any, **kw: Any) -> Any:
        model = build(*a, **kw)
        if pooling == "mean":
            use_mean_pooling(model)
        return model

    lk_train.build_model = build_model  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        summary = lk_train.train(config)
    finally:
        lk_train.build_model = build
    return {
        "dev_accuracy": summary["best_dev"].get("accuracy"),
        "validation_accuracy": summary["best_eval_accuracy"],
        "examples_per_sec": summary["train_examples_per_sec"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pooling.json")
    args = p.parse_args()
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    done = {(r["method"], r["learning_rate"], r["pooling"], r["seed"]) for r in rows}
    for name, method, lr, pooling in RUNS:
        if (method, lr, pooling, args.seed) in done:  # resumable: finished runs are kept
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args, method, lr, pooling, Path(tmp) / "run")
        rows.append(
            {
                "name": name,
                "method": method,
                "learning_rate": lr,
                "pooling": pooling,
                "seed": args.seed,
                **result,
            }
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("| run | pooling | lr | dev | validation | examples/s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} (seed {r['seed']}) | {r['pooling']} | {r['learning_rate']:g} | "
            f"{100 * r['dev_accuracy']:.2f} | {100 * r['validation_accuracy']:.2f} | "
            f"{r['examples_per_sec']:.1f} |"
        )


if __name__ == "__main__":
    main()
