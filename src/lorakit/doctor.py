"""Installation checks, like the learning note's test_installation.py."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Check = tuple[bool, str, str]  # passed, name, detail


def _version(package: str) -> Check:
    try:
        return True, package, importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False, package, "not installed"


def run_checks(data_dir: str | None = None) -> Iterator[Check]:
    for package in ("torch", "transformers", "safetensors", "datasets", "huggingface_hub"):
        yield _version(package)
    for package in ("peft", "onnxruntime", "fastapi"):
        ok, name, detail = _version(package)
        yield True, f"{name} (optional)", detail

    from lorakit.runtime import amp_dtype, pick_device, thread_governor

    device = pick_device()
    yield True, "device", f"{device} ({thread_governor().describe()})"
    yield True, "bf16 fast", _bf16_note(device)
    yield _distributed()
    yield from _embedded_model()
    folder = data_dir or os.environ.get("LORAKIT_DATA_DIR")
    if folder:
        tasks = sorted(p.parent.name for p in Path(folder).glob("*/train.tsv"))
        yield bool(tasks), "data dir", f"{folder}: {', '.join(tasks) or 'no <task>/train.tsv'}"
    else:
        yield True, "data dir", "none set: GLUE comes from datasets.load_dataset (needs the Hub)"
    yield _tiny_step(device, amp_dtype("auto", device))


def _bf16_note(device: torch.device) -> str:
    """Whether bf16 is fast here, which jobs ``--precision auto`` therefore runs in bf16, and
    whether ``LORAKIT_FAST_BF16`` decided it instead of the hardware."""
    from lorakit.runtime import AUTO_BF16_JOBS, FAST_BF16_ENV, bf16_fast

    value = os.environ.get(FAST_BF16_ENV)
    forced = f" ({FAST_BF16_ENV}={value})" if value else ""
    if not bf16_fast(device):
        return f"no{forced}: --precision auto runs fp32"
    jobs = ", ".join(sorted(AUTO_BF16_JOBS))
    return f"yes{forced}: --precision auto runs {jobs} in bf16, export in fp32"


def _distributed() -> Check:
    """The torch.distributed backends torchrun can use here: gloo (CPU), NCCL (CUDA), MPI."""
    import torch.distributed as dist

    if not dist.is_available():
        return False, "distributed", "this torch build has no torch.distributed: one process only"
    found = [
        name
        for name, ok in (
            ("gloo (CPU)", dist.is_gloo_available()),
            ("nccl (CUDA)", dist.is_nccl_available()),
            ("mpi", dist.is_mpi_available()),
        )
        if ok
    ]
    return bool(found), "distributed", ", ".join(found) or "no backend"


def _embedded_model() -> Iterator[Check]:
    from lorakit.errors import LoraKitError
    from lorakit.models import embedded_model_dir

    try:
        path = embedded_model_dir()
        yield (path / "config.json").is_file(), "embedded model", f"minilm at {path}"
    except LoraKitError as e:
        yield False, "embedded model", str(e)
    yield _packaged_model()


def _packaged_model() -> Check:
    """``--model mpnet``: optional, so never a failed check; says how to get it."""
    from lorakit.errors import LoraKitError
    from lorakit.packaged import MPNET, cache_root, find_pieces, unpacked_dir

    name = f"{MPNET.name} (optional)"
    try:
        pieces = find_pieces(MPNET)
    except LoraKitError:
        return True, name, f"not installed: {MPNET.install_hint()}"
    where = unpacked_dir(MPNET)
    if where is not None:
        return True, name, f"{MPNET.hub_id} at {where}"
    size = sum(p.stat().st_size for p in pieces) / 2**20
    return True, name, f"installed ({size:.0f} MB zip); unpacks on first use into {cache_root()}"


def _tiny_step(device, dtype) -> Check:  # noqa: ANN001
    """Forward and backward of a tiny LoRA BERT: the whole stack works."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.inject import apply_lora_to_model
    from lorakit.runtime import autocast
    from lorakit.state import mark_only_lora_as_trainable

    try:
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=50,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            )
        ).to(device)
        apply_lora_to_model(model, ["query", "value"], rank=4, alpha=8)
        mark_only_lora_as_trainable(model)
        with autocast(device, dtype):
            loss = model(
                input_ids=torch.ones(2, 5, dtype=torch.long, device=device),
                labels=torch.tensor([0, 1], device=device),
            ).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
        ok = all(g is not None and torch.isfinite(g).all() for g in grads)
        return ok, "forward/backward", f"tiny LoRA BERT, loss {loss.item():.4f}"
    except Exception as e:  # noqa: BLE001 - report, don't crash the doctor
        return False, "forward/backward", f"{type(e).__name__}: {e}"
