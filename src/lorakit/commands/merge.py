"""``lorakit merge``: flags for ``merge_adapter``; prints where the merged model went."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.commands.flags import add_bool_flag

HELP = "fold an adapter into its base model: a plain transformers directory, no lorakit needed"
EPILOG = """\
The directory holds config.json (with the adapter's labels), model.safetensors and the
tokenizer; AutoModelForSequenceClassification.from_pretrained(OUT) loads it. It is checked
against the unmerged model (logits within 1e-4) before it replaces anything at --out.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "--adapter",
        type=Path,
        required=True,
        metavar="DIR",
        help="adapter directory or Hub id (owner/name)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--model", help="base model (default: the adapter's)")
    add_bool_flag(parser, "overwrite", "replace a non-empty --out", default=False)
    parser.add_argument(
        "--plain_lora",
        action="store_true",
        help="instead of merging, write the rsLoRA or AdaLoRA adapter as the equivalent plain "
        "LoRA adapter (rsLoRA: alpha' = alpha*sqrt(r); AdaLoRA: A*E, per-layer ranks) for "
        "runtimes that know only LoRA",
    )


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from lorakit.export import merge_adapter

    hf_logging.disable_progress_bar()
    if args.plain_lora:
        from lorakit.export import write_plain_lora
        from lorakit.hub import resolve_adapter

        done = write_plain_lora(resolve_adapter(args.adapter), args.out, args.overwrite)
        print(f"✅ Plain LoRA adapter (lora_alpha {done['lora_alpha']:g}) written to {done['out']}")
        return 0
    result = merge_adapter(args.adapter, args.out, args.model, args.overwrite)
    print(f"✅ Merged model written to {result['out']}")
    print(f"   largest logit difference from the unmerged model: {result['max_abs_diff']:.2e}")
    print(f"   load it with AutoModelForSequenceClassification.from_pretrained({result['out']!r})")
    return 0
