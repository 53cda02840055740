"""``lorakit serve``: flags (TEI's names) for ``lorakit.serve``; prints how to call it, runs it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lorakit.commands.flags import add_bool_flag
from lorakit.errors import LoraKitError

HELP = "serve many adapters over one base model: TEI's HTTP API, mixed-adapter batches"
EPILOG = """\
Each --adapter is NAME=DIR (or just DIR, named after its folder; a Hub id works too). All share
one copy of --model; a request picks its adapter with "adapter": NAME (TEI's /predict) or its
URL (/models/NAME, the Hugging Face Inference API), else gets the default adapter.
Stop with Ctrl-C or SIGTERM: the server stops accepting, finishes what is in flight, exits 0.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--model",
        default="",
        help="the base model every adapter shares (default: the first adapter's base model)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to serve (repeatable); the first is the default",
    )
    parser.add_argument(
        "--adapter_dir", metavar="DIR", help="allow runtime loads, from inside DIR only"
    )
    parser.add_argument("--default_adapter", metavar="NAME", help="for requests that name none")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="autocast precision of the forward pass; auto = bf16 where the hardware runs it "
        "fast, else fp32 (/info says which)",
    )
    parser.add_argument(
        "--quantize_base",
        choices=("none", "nf4", "int8"),
        help="store the shared base model's linear layers as nf4 or int8 (QLoRA; default: "
        "as the first adapter was trained)",
    )
    _limit_flags(parser)


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    """TEI's limits, with its names and defaults."""
    parser.add_argument(
        "--max_batch_tokens",
        type=int,
        default=16384,
        metavar="N",
        help="padded tokens per forward pass",
    )
    parser.add_argument(
        "--max_batch_requests",
        type=int,
        metavar="N",
        help="rows per forward pass (default: no limit but the tokens)",
    )
    parser.add_argument(
        "--max_concurrent_requests",
        type=int,
        default=512,
        metavar="N",
        help="requests in flight before new ones get 429",
    )
    parser.add_argument(
        "--max_client_batch_size", type=int, default=32, metavar="N", help="inputs per request"
    )
    parser.add_argument(
        "--max_input_length",
        type=int,
        metavar="N",
        help="tokens per input (default: the model's positions)",
    )
    add_bool_flag(parser, "auto_truncate", "cut over-long inputs instead of refusing them (413)")
    parser.add_argument(
        "--payload_limit", type=int, default=2_000_000, metavar="BYTES", help="largest request body"
    )


def _adapter_args(values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep:
            name, directory = Path(value.rstrip("/")).name, value
        if not name or not directory:
            raise LoraKitError(f"--adapter {value!r}: give NAME=DIR")
        pairs.append((name, directory))
    return pairs


def run(args: argparse.Namespace) -> int:
    import os

    from lorakit.extras import require_extra

    # OpenMP's wait policy is left to the environment: spinning idle threads (its default)
    # served 1.2-1.6x more requests/s than OMP_WAIT_POLICY=PASSIVE once the load generator no
    # longer took a core of its own, and the thread governor drops to one thread when other
    # processes want the cores (docs/benchmarks-log.md, serving runs 9-11).
    # oneDNN keeps a compiled primitive per tensor shape (1,024 by default); a server sees a
    # new batch shape nearly every batch, so the cache only grows. A small one costs no
    # measurable speed here (docs/benchmarks-log.md, the long soak).
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
    require_extra("serve", "lorakit serve")
    from lorakit.runtime import pin_mmap_threshold
    from lorakit.serve import ServeSettings, build_server, run_server

    # Batches of ever-changing shapes would otherwise fragment the heap (with the two settings
    # above and the batcher's periodic trim: docs/benchmarks-log.md, the long soaks).
    pin_mmap_threshold()

    for flag in (
        "max_batch_tokens",
        "max_concurrent_requests",
        "max_client_batch_size",
        "payload_limit",
    ):
        if getattr(args, flag) <= 0:
            raise LoraKitError(f"--{flag} must be positive")
    settings = ServeSettings(
        model=args.model,
        adapters=_adapter_args(args.adapter),
        adapter_dir=args.adapter_dir,
        default_adapter=args.default_adapter,
        host=args.host,
        port=args.port,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_requests=args.max_batch_requests,
        max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size,
        max_input_length=args.max_input_length,
        auto_truncate=bool(getattr(args, "auto_truncate", False)),
        payload_limit=args.payload_limit,
        precision=args.precision,
        quantize_base=args.quantize_base,
    )
    server = build_server(settings)
    _banner(server, args.host, args.port)
    run_server(server, args.host, args.port)
    return 0


def _banner(server: Any, host: str, port: int) -> None:
    """What is served where, and a first request to try."""
    from lorakit.runtime import precision_name

    url = f"http://{host}:{port}"
    print(
        f"🚀 lorakit serve: {server.adapters.model_name} with {len(server.adapters.adapters)} "
        f"adapter(s) at {url}, precision {precision_name(server.adapters.amp)}"
    )
    for a in server.adapters.adapters.values():
        mark = " (default)" if a.name == server.default else ""
        print(f"   {a.name}{mark}: {a.task or '?'} · labels {', '.join(a.labels)} · {a.path}")
    example = server.default or "NAME"
    print(f"   try it:  open {url}/  or")
    print(
        f"   curl {url}/predict -H 'Content-Type: application/json' "
        f'-d \'{{"inputs": "A gorgeous, witty film.", "adapter": "{example}"}}\''
    )
