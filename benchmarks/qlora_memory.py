"""QLoRA's memory: the frozen base's bytes and peak RSS, training and serving, per storage.

    .venv/bin/python benchmarks/qlora_memory.py --data_dir ../shared/data --models minilm mpnet

For each model and each storage of the frozen base (fp32, bf16, int8, nf4), one process per
job, so each peak is its own:
- train: the config's LoRA recipe (configs/sst2_<model>.yaml) on a fp32 or bf16 base, or a
  base quantized by ``lorakit.quantize_base``; ``--steps`` AdamW steps of batch 32 on the
  longest SST-2 training rows (max length 128), fp32 compute outside the bf16 base;
- serve: ``lorakit serve``'s AdapterSet with one adapter, scoring the same 32 rows (not for
  bf16: serve keeps fp32 weights, and its bf16 is autocast, ``--precision bf16``).
Peak RSS is Linux's high-water mark (VmHWM), reset after loading (``/proc/self/clear_refs``),
so ``load_peak_mb`` (loading, quantizing) and ``peak_mb`` (the job itself) are apart.
``base_mb`` is the bytes of the layers that quantization replaces, as stored. Writes
benchmarks/results/qlora_memory.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import ROOT, cpu_name

# bf16: the frozen base stored and run in bf16, LoRA and the head fp32 (``--base_dtype bf16``,
# ``lorakit.state.store_frozen_as``). nf4-bf16: an nf4 base with bf16 autocast compute over an
# fp32 rest. nf4-bf16base: an nf4 base whose other frozen tensors (embeddings, LayerNorms) are
# bf16 and which dequantizes to bf16 (``--quantize_base nf4 --base_dtype bf16``: the QLoRA
# setup). The others compute in fp32.
STORAGES = ("fp32", "bf16", "int8", "nf4", "nf4-bf16", "nf4-bf16base")
OUT = ROOT / "benchmarks" / "results" / "qlora_memory.json"


def _status(key: str) -> float:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _rows(data_dir: str, tokenizer, n: int = 32) -> dict:  # noqa: ANN001
    from lorakit.config import DataSettings
    from lorakit.data import load_examples

    ex = load_examples(DataSettings(subset="sst2", data_dir=data_dir), "train").head(4000)
    texts = sorted((t[0] for t in ex.texts), key=len)[-n:]  # the longest: the largest batch
    batch = tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
    return {"texts": texts, "batch": batch}


def _base(model_name: str, storage: str):  # noqa: ANN202
    """The model with the config's LoRA and its base stored as ``storage``."""
    import torch

    from lorakit.config import load_config
    from lorakit.inject import apply_lora_to_model, quantize_base
    from lorakit.models import load_model
    from lorakit.quant import release_freed_memory
    from lorakit.state import mark_only_lora_as_trainable, store_frozen_as

    config = load_config(ROOT / "configs" / f"sst2_{model_name}.yaml")
    model = load_model(config.model_name, {0: "negative", 1: "positive"})
    lora = config.lora
    apply_lora_to_model(model, lora.target_modules, lora.rank, lora.alpha, lora.dropout)
    mark_only_lora_as_trainable(model)
    stats = {}
    if storage.split("-")[0] in ("int8", "nf4"):
        stats = quantize_base(model, storage.split("-")[0])
    if storage in ("bf16", "nf4-bf16base"):  # as train's --base_dtype bf16 does it
        store_frozen_as(model, torch.bfloat16)
        release_freed_memory()
    gc.collect()
    return model, config, stats


def _base_bytes(model) -> float:  # noqa: ANN001
    """MiB of the linear layers outside the head (what quantization replaces), as stored."""
    from lorakit.inject import linear_layer_names
    from lorakit.quant import QuantLinear
    from lorakit.wrapper import LinearWithLoRA

    total = 0
    for name in linear_layer_names(model):
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LinearWithLoRA) else module
        if isinstance(base, QuantLinear):
            total += base.stored_bytes()
        else:
            total += base.weight.numel() * base.weight.element_size()
    return total / 2**20


def child_train(model_name: str, storage: str, data_dir: str, steps: int) -> dict:
    import torch

    from lorakit.models import load_tokenizer

    model, config, _ = _base(model_name, storage)
    rows = _rows(data_dir, load_tokenizer(config.model_name))
    labels = torch.tensor([i % 2 for i in range(len(rows["texts"]))])
    load_peak = _status("VmHWM")
    _reset_peak()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", torch.bfloat16, enabled=storage == "nf4-bf16"):
            loss = model(**rows["batch"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - start) / steps
    return {
        "base_mb": round(_base_bytes(model), 1),
        "load_peak_mb": round(load_peak),
        "peak_mb": round(_status("VmHWM")),
        "step_s": round(seconds, 2),
    }


def child_serve(model_name: str, storage: str, data_dir: str) -> dict:

    from lorakit.adapter import save_adapter
    from lorakit.multi import AdapterSet

    model, config, _ = _base(model_name, "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp, base_model_name_or_path=config.model_name, task="sst2")
        del model
        gc.collect()
        quantize = storage.split("-")[0] if storage.split("-")[0] in ("int8", "nf4") else "none"
        precision = "bf16" if storage == "nf4-bf16" else "fp32"
        adapters = AdapterSet(config.model_name, precision=precision, quantize_base=quantize)
        adapters.load("sst2", tmp)
    gc.collect()
    rows = _rows(data_dir, adapters.tokenizer)
    load_peak = _status("VmHWM")
    _reset_peak()
    batch = dict(rows["batch"])
    names = ["sst2"] * len(rows["texts"])
    adapters.logits(batch, names)  # warm
    start = time.perf_counter()
    for _ in range(3):
        adapters.logits(batch, names)
    return {
        "base_mb": round(_base_bytes(adapters.model), 1),
        "load_peak_mb": round(load_peak),
        "peak_mb": round(_status("VmHWM")),
        "batch_s": round((time.perf_counter() - start) / 3, 3),
    }


def table(records: list[dict]) -> str:
    lines = [
        "| model | base storage | base MiB | train: load peak MiB | train: peak MiB "
        "| train: s/step | serve: peak MiB | serve: s/batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["model"], r["storage"], r["job"]): r for r in records}
    for model in dict.fromkeys(r["model"] for r in records):
        for storage in STORAGES:
            t, s = by_key.get((model, storage, "train")), by_key.get((model, storage, "serve"))
            if t is None and s is None:
                continue
            lines.append(
                f"| {model} | {storage} | {(t or s)['base_mb']} | {t['load_peak_mb'] if t else ''}"
                f" | {t['peak_mb'] if t else ''} | {t['step_s'] if t else ''}"
                f" | {s['peak_mb'] if s else ''} | {s['batch_s'] if s else ''} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--models", nargs="+", default=["minilm", "mpnet"])
    p.add_argument("--storages", nargs="+", default=list(STORAGES), choices=STORAGES)
    p.add_argument("--jobs", nargs="+", default=["train", "serve"], choices=["train", "serve"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT, help="where the records go (JSON)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model, storage, job = args.child
        if job == "train":
            result = child_train(model, storage, args.data_dir, args.steps)
        else:
            result = child_serve(model, storage, args.data_dir)
        print(json.dumps(result))
        return
    records = []
    for model in args.models:
        for storage in args.storages:
            for job in args.jobs:
                if job == "serve" and storage in ("bf16", "nf4-bf16base"):
                    continue  # serve keeps fp32 weights; its bf16 is autocast (--precision)
                cmd = [sys.executable, __file__, "--child", model, storage, job]
                cmd += ["--data_dir", args.data_dir, "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                record = {"model": model, "storage": storage, "job": job}
                record.update(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(record), flush=True)
                records.append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": cpu_name(), "date": datetime.date.today().isoformat(), "argv": sys.argv}
    args.out.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
