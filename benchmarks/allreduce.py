"""Time of the all-reduces a distributed lorakit step makes, between torchrun's processes.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 benchmarks/allreduce.py

DDP all-reduces the trainable tensors only: 338,690 fp32 values for MiniLM at r=8 on
query/key/value/dense (1.35 MB); the loop also all-reduces a 4-byte stop flag each step.
Rank 0 prints the median and 10th percentile of 100 of each (gloo, CPU tensors).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

SIZES = {"LoRA gradients of MiniLM (1.35 MB)": 338_690, "stop flag (4 B)": 1}


def main() -> None:
    dist.init_process_group("gloo")
    for label, n in SIZES.items():
        x = torch.randn(n)
        for _ in range(5):
            dist.all_reduce(x)
        seconds = []
        for _ in range(100):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            seconds.append(time.perf_counter() - start)
        if dist.get_rank() == 0:
            ms = sorted(s * 1e3 for s in seconds)
            print(f"{label}: median {statistics.median(ms):.3f} ms, p10 {ms[10]:.3f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
