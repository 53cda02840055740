"""Peak memory of training at batch 32: LoRA vs full fine-tuning, MiniLM and BERT-base shapes.

    .venv/bin/python benchmarks/train_memory.py

Each variant runs in its own process, so its peak RSS (``ru_maxrss``) is its own: load the model,
build AdamW over what trains, then take ``--steps`` optimizer steps on batches of ``--batch``
random token sequences of ``--seq_len`` tokens (128 = the shipped configs' max_length, the
largest batch a run can meet). "LoRA" is lorakit's own injection (r=8 on query/key/value/dense,
head trainable, base frozen); "full" trains every parameter. The BERT-base-shaped model has
bert-base-uncased's config (``BertConfig()``) and random weights, so no download is needed.
``--malloc default`` leaves glibc's self-adjusting mmap threshold; ``pinned`` runs the child with
``MALLOC_MMAP_THRESHOLD_=4194304`` (blocks above 4 MiB always mmapped, so freed activations go
back to the system); give both to compare. Prints a markdown table and appends it
to docs/benchmarks-log.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
from train_throughput import _rss_mb, cpu_name, publish

MODELS = {"minilm": "embedded MiniLM (all-MiniLM-L6-v2)", "bert-base": "BERT-base shape (random)"}
MODES = ("lora", "full")
MALLOC = {"default": {}, "pinned": {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}}


def build(model_name: str, mode: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.inject import apply_lora_to_model
    from lorakit.models import load_model
    from lorakit.state import mark_only_lora_as_trainable

    if model_name == "minilm":
        model = load_model("minilm", {0: "negative", 1: "positive"})
    else:
        model = BertForSequenceClassification(BertConfig(num_labels=2))
    if mode == "lora":
        apply_lora_to_model(model, ["query", "key", "value", "dense"], rank=8, alpha=8.0)
        mark_only_lora_as_trainable(model)
    return model


def child(model_name: str, mode: str, batch: int, seq_len: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build(model_name, mode)
    model.train()
    after_load = _rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    seconds = []
    for _ in range(steps):
        ids = torch.randint(1000, vocab, (batch, seq_len))
        labels = torch.randint(0, 2, (batch,))
        tick = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - tick)
    return {
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "rss_after_load_mb": after_load,
        "peak_rss_mb": _rss_mb(),
        "last_step_s": seconds[-1],
    }


def parent(args: argparse.Namespace) -> None:
    rows = {}
    for model_name in args.models:
        for malloc in args.malloc:
            for mode in MODES:
                cmd = [sys.executable, __file__, "--child", model_name, mode]
                cmd += ["--batch", str(args.batch), "--seq_len", str(args.seq_len)]
                cmd += ["--steps", str(args.steps)]
                env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
                env.update(MALLOC[malloc])
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.exit(f"{model_name}/{mode}/{malloc} failed:\n{proc.stderr[-3000:]}")
                rows[model_name, mode, malloc] = json.loads(lines[-1][7:])
                print(model_name, mode, malloc, rows[model_name, mode, malloc], flush=True)
    report(rows, args)


def report(rows: dict, args: argparse.Namespace) -> None:
    lines = [
        f"### Training memory: LoRA vs full fine-tuning, {datetime.date.today()}",
        "",
        f"Command: `.venv/bin/python benchmarks/train_memory.py --batch {args.batch} "
        f"--seq_len {args.seq_len} --steps {args.steps} --malloc {' '.join(args.malloc)}`  ",
        f"Machine: {cpu_name()}, torch {torch.__version__}, fp32.  ",
        f"Setup: batch {args.batch} x {args.seq_len} tokens, {args.steps} AdamW steps, each "
        "variant in its own process. LoRA = lorakit r=8 on query/key/value/dense + head; full = "
        "every parameter trains. malloc: default = glibc's self-adjusting mmap threshold, "
        "pinned = `MALLOC_MMAP_THRESHOLD_=4194304`.",
        "",
        "| model | training | malloc | trainable / total params | RSS after load MB "
        "| peak RSS MB | peak - load MB | s/step |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for (model_name, mode, malloc), r in rows.items():
        lines.append(
            f"| {MODELS[model_name]} | {mode} | {malloc} | {r['trainable_params']:,} / "
            f"{r['total_params']:,} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['rss_after_load_mb']:.0f} | {r['last_step_s']:.2f} |"
        )
    publish("\n".join(lines) + "\n", args.no_docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--malloc", nargs="+", default=["default"], choices=list(MALLOC))
    p.add_argument("--no_docs", action="store_true", help="print only")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = child(*args.child, args.batch, args.seq_len, args.steps)
        print("RESULT " + json.dumps(result))
    else:
        parent(args)


if __name__ == "__main__":
    main()
