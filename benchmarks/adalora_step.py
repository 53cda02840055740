"""AdaLoRA's training step, lorakit against PEFT, interleaved in one process.

    .venv/bin/python benchmarks/adalora_step.py --data_dir ../shared/data --rounds 5 --steps 6

Both wrap the embedded MiniLM's query/key/value/dense with AdaLoRA (init_r 12, target_r 8,
alpha 8, no dropout), in the budgeting phase with a mask at every step (deltaT 1, the costliest
case). One step: forward and backward of 32 SST-2 training rows (max length 128, padded to the
batch's longest), orthogonality term, AdamW step, the budget update (lorakit's ``RankBudget``,
PEFT's ``update_and_allocate``), zero_grad. Rounds alternate the two sides so that the machine's
drift hits both; the figure is the median step over all rounds. Prints a JSON line and appends
it to benchmarks/results/adalora_step.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
from peer_sweep import peft_model, recipe
from train_throughput import ROOT, cpu_name

SCHEDULE = {"target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 100_000}


def ours(config_path):  # noqa: ANN001, ANN201
    from lorakit.budget import RankBudget
    from lorakit.config import load_config
    from lorakit.dropout import use_fast_dropout
    from lorakit.inject import apply_adalora_to_model
    from lorakit.models import load_model
    from lorakit.state import mark_only_lora_as_trainable

    config = load_config(config_path, {"lora.variant": "adalora", "lora.target_r": 8})
    model = load_model("minilm", {0: "negative", 1: "positive"})
    apply_adalora_to_model(model, config.lora.target_modules, 12, 8.0, 0.0)
    mark_only_lora_as_trainable(model)
    use_fast_dropout(model)  # as lorakit train does on the CPU
    config.lora.rank = 12
    budget = RankBudget(model, config.lora, SCHEDULE["total_step"])
    return model.train(), budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="timed steps per side and round")
    args = p.parse_args()
    from lorakit.config import DataSettings
    from lorakit.data import load_examples
    from lorakit.models import load_tokenizer

    config_path = ROOT / "configs" / "sst2_minilm.yaml"
    rec = {**recipe(config_path), "dropout": 0.0}
    ex = load_examples(DataSettings(subset="sst2", data_dir=args.data_dir), "train").head(4096)
    tokenizer = load_tokenizer("minilm")
    batches = []
    for i in range(0, 32 * (args.steps + 1), 32):
        texts = [t[0] for t in ex.texts[i : i + 32]]
        enc = tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor(ex.labels[i : i + 32])})
    torch.manual_seed(0)
    lk_model, budget = ours(config_path)
    peft = peft_model(rec, 12, SCHEDULE).train()
    sides = {
        "lorakit": (lk_model, lambda model, step: budget.step(model, step), budget.orth_loss),
        "peft": (peft, lambda model, step: model.base_model.update_and_allocate(step), None),
    }
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        for name, (m, _, _) in sides.items()
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    step = 0
    for _ in range(args.rounds):
        for name, (model, allocate, orth) in sides.items():
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                out = model(**batch)
                loss = out.loss + (orth(model, out) if orth else 0)  # PEFT's forward adds its own
                loss.backward()
                optimizers[name].step()
                allocate(model, step + i + 1)
                optimizers[name].zero_grad(set_to_none=True)
                if i:  # the first step of each round warms up
                    times[name].append(time.perf_counter() - start)
        step += len(batches)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": cpu_name(),
        "threads": torch.get_num_threads(),
        **{f"{name}_step_s": round(statistics.median(t), 4) for name, t in times.items()},
    }
    result["lorakit_speedup"] = round(result["peft_step_s"] / result["lorakit_step_s"], 2)
    print(json.dumps(result))
    with (ROOT / "benchmarks" / "results" / "adalora_step.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
