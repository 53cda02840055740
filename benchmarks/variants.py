"""LoRA variants side by side, lorakit's implementation against PEFT's, on one short recipe.

    .venv/bin/python benchmarks/variants.py --data_dir ../shared/data --samples 4096

For LoRA, rsLoRA (r 8 and 32), DoRA, LoRA+ and IA³: the embedded MiniLM is trained for one
epoch on the first ``--samples`` SST-2 training rows (batch 32, lr 1e-3 — 5e-3 for IA³, whose
vectors start at one —, alpha 8, no dropout, fp32, the same length-grouped batches for both
sides) and scored on all 872 validation rows. Both sides run the same plain loop (AdamW,
linear decay, clipping at 1.0): only the model differs, lorakit's layers or PEFT's (LoRA+
uses lorakit's parameter groups or PEFT's ``create_loraplus_optimizer``). Step time is the mean
of the steps after the first 5. Prints a markdown table; ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 5
VARIANTS = {
    "lora": {"rank": 8},
    "rslora_r8": {"rank": 8, "use_rslora": True},
    "rslora_r32": {"rank": 32, "use_rslora": True},
    "dora": {"rank": 8, "use_dora": True},
    "loraplus": {"rank": 8, "loraplus": 16.0},
    "ia3": {"ia3": True},
}
TARGETS = ["query", "key", "value", "dense"]
IA3_TARGETS, IA3_FF = ["key", "value", "output.dense"], ["output.dense"]


def _data(data_dir: str, samples: int, tokenizer):  # noqa: ANN001, ANN202
    from lorakit.config import DataSettings
    from lorakit.data import encode, load_examples

    settings = DataSettings(data_dir=data_dir)
    train = load_examples(settings, "train").head(samples)
    val = load_examples(settings, "validation", train.label_names)
    return encode(train, tokenizer, 128), encode(val, tokenizer, 128)


def _lorakit_model(spec: dict):  # noqa: ANN202
    from lorakit import mark_only_lora_as_trainable
    from lorakit.inject import apply_ia3_to_model, apply_lora_to_model
    from lorakit.models import load_model

    model = load_model("minilm", {0: "negative", 1: "positive"})
    if spec.get("ia3"):
        apply_ia3_to_model(model, IA3_TARGETS, IA3_FF)
    else:
        apply_lora_to_model(
            model,
            TARGETS,
            spec["rank"],
            8.0,
            0.0,
            use_rslora=spec.get("use_rslora", False),
            use_dora=spec.get("use_dora", False),
        )
    mark_only_lora_as_trainable(model)
    return model


def _peft_model(spec: dict):  # noqa: ANN202
    import peft
    from transformers import AutoModelForSequenceClassification

    from lorakit.models import resolve_model

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)
    if spec.get("ia3"):
        config = peft.IA3Config(
            task_type="SEQ_CLS", target_modules=IA3_TARGETS, feedforward_modules=IA3_FF
        )
    else:
        config = peft.LoraConfig(
            task_type="SEQ_CLS",
            r=spec["rank"],
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=TARGETS,
            use_rslora=spec.get("use_rslora", False),
            use_dora=spec.get("use_dora", False),
        )
    return peft.get_peft_model(base, config)


def _optimizer(side: str, model, spec: dict, lr: float):  # noqa: ANN001, ANN202
    ratio = spec.get("loraplus", 0.0)
    if not ratio:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if side == "lorakit":
        from lorakit.train import param_groups

        return torch.optim.AdamW(param_groups(model, lr, 0.0, ratio), lr=lr)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)


def run(side: str, name: str, data_dir: str, samples: int) -> dict:
    """Train and evaluate one variant with one implementation; the figures as a dict."""
    from transformers import get_linear_schedule_with_warmup

    from lorakit import save_adapter
    from lorakit.data import batch_order, collate
    from lorakit.evaluate import evaluate
    from lorakit.models import load_tokenizer

    torch.manual_seed(0)
    spec = VARIANTS[name]
    model = _lorakit_model(spec) if side == "lorakit" else _peft_model(spec)
    train, val = _data(data_dir, samples, load_tokenizer("minilm"))
    lr = 5e-3 if spec.get("ia3") else 1e-3
    optimizer = _optimizer(side, model, spec, lr)
    batches = batch_order(train.lengths, 32, 0, 0, True)
    schedule = get_linear_schedule_with_warmup(optimizer, len(batches) // 10, len(batches))
    trainable = [p for p in model.parameters() if p.requires_grad]
    times = []
    model.train()
    for idx in batches:
        start = time.perf_counter()
        loss = model(**collate(train, idx)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    metrics = evaluate(model, val, 64, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        if side == "lorakit":
            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp)
        size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {
        "side": side,
        "variant": name,
        "accuracy": metrics["accuracy"],
        "trainable_params": sum(p.numel() for p in trainable),
        "adapter_kib": round(size / 1024, 1),
        "step_ms": round(1000 * statistics.mean(times[WARMUP:]), 1),
        "steps": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(*args.child, args.data_dir, args.samples)))
        return
    rows = []
    for name in args.variants.split(","):
        for side in ("lorakit", "peft"):  # each in its own process: nothing carries over
            cmd = [sys.executable, __file__, "--child", side, name]
            cmd += ["--data_dir", args.data_dir, "--samples", str(args.samples)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(table(rows, args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


def table(rows: list[dict], args: argparse.Namespace) -> str:
    by = {(r["variant"], r["side"]): r for r in rows}
    lora = by.get(("lora", "lorakit"))
    lines = [
        f"Variants, {datetime.date.today()}, {args.samples} SST-2 rows, 1 epoch, 872 validation "
        "rows; `.venv/bin/python benchmarks/variants.py --data_dir ../shared/data "
        f"--samples {args.samples}`",
        "",
        "| variant | lorakit acc | PEFT acc | trainable | adapter KiB | lorakit ms/step | "
        "PEFT ms/step | lorakit / PEFT time | vs lorakit LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        ours, theirs = by.get((name, "lorakit")), by.get((name, "peft"))
        if not ours or not theirs:
            continue
        rel = f"{ours['step_ms'] / lora['step_ms']:.2f}x" if lora else "-"
        lines.append(
            f"| {name} | {ours['accuracy']:.2%} | {theirs['accuracy']:.2%} | "
            f"{ours['trainable_params']:,} | {ours['adapter_kib']} | {ours['step_ms']} | "
            f"{theirs['step_ms']} | {ours['step_ms'] / theirs['step_ms']:.2f} | {rel} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
