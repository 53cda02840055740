"""Training and prediction alone vs beside a busy process, with and without the thread governor.

    .venv/bin/python benchmarks/shared_cpu.py --data_dir ../shared/data

Each measurement is a fresh process running the shipped SST-2 recipe's training steps (the
same calls as ``lorakit train``: forward, backward, clip, AdamW, the governor's poll) or the
merged model's batched prediction of the validation split (``run_logits``, which polls it),
timed after a warm-up. Competitors: none ("alone"), a Python busy loop (one core busy), and
a torch matmul loop on 2 threads (another torch job). Policies: lorakit's default (the
governor, ``lorakit.runtime.ThreadGovernor``) and a fixed thread count of all cores
(``LORAKIT_THREADS``, i.e. what torch does by default). Writes
benchmarks/results/shared_cpu.json and appends a section to docs/benchmarks-log.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPETITORS = {
    "alone": None,
    "a busy process (1 core)": "while True: pass",
    "another torch job (2 threads)": (
        "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True: a @ a"
    ),
}


def job(kind: str, steps: int, data_dir: str) -> None:
    """Runs in the child: prints examples/s and the thread count at the end."""
    import torch

    from lorakit.batches import run_logits, torch_logits_fn
    from lorakit.config import load_config
    from lorakit.data import batch_order, collate
    from lorakit.models import load_tokenizer
    from lorakit.runtime import thread_governor
    from lorakit.state import unwrap_lora
    from lorakit.train import build_model, build_optimizer, load_data

    torch.manual_seed(0)
    config = load_config(
        ROOT / "configs" / "sst2_minilm.yaml",
        {"data.data_dir": data_dir, "training.max_train_samples": 4000},
    )
    t = config.training
    train_ex, train_data, eval_data, _ = load_data(config, load_tokenizer(config.model_name))
    model = build_model(config, train_ex.label_names, torch.device("cpu"))
    governor = thread_governor()
    if kind == "predict":
        model.eval()
        unwrap_lora(model)
        fn = torch_logits_fn(model, torch.device("cpu"), None)
        with torch.inference_mode():
            run_logits(eval_data, fn, 64)
            tick, n = time.perf_counter(), 0
            for _ in range(steps):
                run_logits(eval_data, fn, 64)
                n += len(eval_data)
    else:
        opt, sched, _ = build_optimizer(config, model, len(train_ex.texts))
        params = [q for g in opt.param_groups for q in g["params"]]
        order = batch_order(train_data.lengths, t.batch_size, t.seed, 0, t.group_by_length)
        model.train()
        for i, idx in enumerate(order[: steps + 3]):
            if i == 3:
                tick, n = time.perf_counter(), 0
            loss = model(**collate(train_data, idx)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            governor.poll()
            if i >= 3:
                n += len(idx)
    rate = n / (time.perf_counter() - tick)
    print(json.dumps({"rate": rate, "threads": torch.get_num_threads()}))


def measure(kind: str, steps: int, data_dir: str, policy: dict, competitor: str | None) -> dict:
    env = {**os.environ, **policy}
    comp = subprocess.Popen([sys.executable, "-c", competitor]) if competitor else None
    try:
        time.sleep(1.0)
        cmd = [sys.executable, __file__, "--job", kind, "--steps", str(steps)]
        out = subprocess.run(
            [*cmd, "--data_dir", data_dir], env=env, capture_output=True, text=True, check=True
        )
    finally:
        if comp is not None:
            comp.kill()
            comp.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--job", choices=["train", "predict"], help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--train_steps", type=int, default=40)
    p.add_argument("--predict_rounds", type=int, default=3)
    p.add_argument("--no_docs", action="store_true")
    args = p.parse_args()
    if args.job:
        job(args.job, args.steps, args.data_dir)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import cpu_name, publish

    cores = str(len(os.sched_getaffinity(0)))
    policies = {
        "lorakit default (governor)": {},
        f"fixed {cores} threads": {"LORAKIT_THREADS": cores},
    }
    results: dict = {}
    for kind, steps in (("train", args.train_steps), ("predict", args.predict_rounds)):
        for pname, policy in policies.items():
            for cname, competitor in COMPETITORS.items():
                r = measure(kind, steps, args.data_dir, policy, competitor)
                results.setdefault(kind, {}).setdefault(pname, {})[cname] = r
                print(kind, pname, cname, r, flush=True)
    record = {"date": str(datetime.date.today()), "machine": cpu_name(), "results": results}
    (ROOT / "benchmarks" / "results" / "shared_cpu.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"### Shared machine: alone vs beside a busy process, {record['date']}",
        "",
        f"Command: `.venv/bin/python benchmarks/shared_cpu.py --data_dir {args.data_dir}`  ",
        f"Machine: {record['machine']}. Training: {args.train_steps} steps of the shipped recipe "
        f"(batch 32); prediction: the merged model over the 872 validation sentences x "
        f"{args.predict_rounds}. One fresh process per cell; thr: its thread count at the end.",
        "",
        "| job | policy | alone | beside a busy process | shared / alone "
        "| beside another torch job | shared / alone |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kind, by_policy in results.items():
        unit = "examples/s" if kind == "train" else "sentences/s"
        for pname, cells in by_policy.items():
            alone, busy, torch_job = (cells[c] for c in COMPETITORS)
            shared = busy["rate"] / alone["rate"]
            lines.append(
                f"| {kind} ({unit}) | {pname} | {alone['rate']:.1f} ({alone['threads']} thr) | "
                f"{busy['rate']:.1f} ({busy['threads']} thr) | {shared:.0%} | "
                f"{torch_job['rate']:.1f} ({torch_job['threads']} thr) | "
                f"{torch_job['rate'] / alone['rate']:.0%} |"
            )
    publish("\n".join(lines) + "\n", args.no_docs)


if __name__ == "__main__":
    main()
