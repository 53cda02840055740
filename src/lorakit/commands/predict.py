"""``lorakit predict``: the interactive, demo, text and file modes around a ``Predictor``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.commands.flags import add_bool_flag
from lorakit.errors import LoraKitError

if TYPE_CHECKING:
    from rich.console import Console

    from lorakit.predict import Prediction, Predictor, Text

HELP = "label texts with an adapter (or an exported .onnx): interactive, demo, one text, a file"
EPILOG = """\
modes (default: file with --file, text with --text, else interactive):
  interactive  type a sentence, see its label and confidence; :q, Ctrl-D or Ctrl-C leave
  demo         ten built-in sentences (negation and mixed feelings included) as a table
  text         one --text (and --text_pair for pair tasks); --json prints one JSON object
  file         --file F (.txt one text a line, tab between a pair; .tsv/.csv with a header;
               .jsonl objects) -> --out preds.jsonl, or stdout; bad rows are reported on
               stderr with their line numbers and skipped
--onnx model.onnx runs the graph `lorakit export` wrote through onnxruntime; it reads
  model.json (labels, max_length) and model.tokenizer/ beside it (see lorakit export --help)
"""
MODES = ("interactive", "demo", "text", "file")
QUIT = (":q", ":quit")
BAR = 24


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--adapter",
        type=Path,
        metavar="DIR",
        help="adapter directory (lorakit or PEFT) or Hub id (owner/name)",
    )
    source.add_argument(
        "--onnx", type=Path, metavar="FILE", help="model.onnx written by lorakit export"
    )
    parser.add_argument("--mode", choices=MODES, help="see below")
    parser.add_argument("--text", help="the text to label (--mode text)")
    parser.add_argument("--text_pair", help="the second sentence, for pair tasks (MRPC, RTE ...)")
    parser.add_argument(
        "--file", type=Path, metavar="F", help="a .txt, .tsv, .csv or .jsonl file to label"
    )
    parser.add_argument(
        "--out", type=Path, metavar="F", help="where --file's predictions go (.jsonl)"
    )
    parser.add_argument(
        "--text_columns", nargs="+", metavar="COL", help="columns of --file holding the text"
    )
    parser.add_argument("--json", action="store_true", help="--mode text: print JSON")
    add_bool_flag(
        parser,
        "merge",
        "fold LoRA into the base weights, base-model speed (default); --no_merge runs it "
        "beside them",
        default=True,
    )
    parser.add_argument("--model", help="base model (default: the adapter's)")
    parser.add_argument(
        "--max_length", type=int, metavar="N", help="tokens per text (default: the adapter's)"
    )
    parser.add_argument(
        "--batch_size", type=int, default=32, metavar="N", help="texts per forward pass"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps ...")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto = bf16 only where the hardware runs it fast, else fp32",
    )
    parser.add_argument(
        "--quantize_base",
        choices=("none", "nf4", "int8"),
        help="base weights as nf4 or int8 (QLoRA; default: as the adapter was trained); a "
        "quantized base runs unmerged",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lorakit.extras import require_extra
    from lorakit.paths import check_writable

    mode = _mode(args)
    if args.onnx is not None:
        require_extra("onnx", "--onnx")
    if args.out is not None:
        check_writable(args.out, "file")
    predictor = _predictor(args)
    console = Console(highlight=False)
    if mode == "interactive":
        return _interactive(predictor, console)
    if mode == "demo":
        return _demo(predictor, console)
    if mode == "text":
        return _text(args, predictor, console)
    return _file(args, predictor)


def _mode(args: argparse.Namespace) -> str:
    """The mode asked for (or implied by --file / --text), checked against the other flags."""
    mode: str = args.mode or (
        "file" if args.file else "text" if args.text is not None else "interactive"
    )
    if mode == "text" and args.text is None:
        raise LoraKitError('--mode text needs --text "..."')
    if mode == "file" and args.file is None:
        raise LoraKitError("--mode file needs --file F")
    if args.file is not None and mode != "file":
        raise LoraKitError(f"--file goes with --mode file, not --mode {mode}")
    if (args.text is not None or args.text_pair is not None) and mode != "text":
        raise LoraKitError(f"--text goes with --mode text, not --mode {mode}")
    if args.out is not None and mode != "file":
        raise LoraKitError("--out is for --file predictions")
    if args.onnx is not None and not args.merge:
        raise LoraKitError("--no_merge does not apply to --onnx (the graph is always merged)")
    if args.max_length is not None and args.max_length <= 0:
        raise LoraKitError(f"--max_length must be positive, got {args.max_length}")
    if args.batch_size <= 0:
        raise LoraKitError(f"--batch_size must be positive, got {args.batch_size}")
    return mode


def _predictor(args: argparse.Namespace) -> Predictor:
    from transformers.utils import logging as hf_logging

    from lorakit.predict import Predictor

    hf_logging.disable_progress_bar()  # no weight-loading bars before a prompt or a table
    if args.onnx is not None:
        return Predictor.from_onnx(args.onnx, args.max_length, args.batch_size)
    return Predictor.from_adapter(
        args.adapter,
        args.model,
        merge=args.merge,
        device=args.device,
        precision=args.precision,
        max_length=args.max_length,
        batch_size=args.batch_size,
        quantize_base=args.quantize_base,
    )


def _bar(p: float, width: int = BAR) -> str:
    full = round(p * width)
    return "█" * full + "░" * (width - full)


def _show(console: Console, pred: Prediction, max_length: int) -> None:
    """The label with every label's probability as a bar, the winner highlighted."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    for name, p in pred["probs"].items():
        style = "bold green" if name == pred["label"] else "dim"
        grid.add_row(f"[{style}]{name}[/]", f"[{style}]{_bar(p)}[/]", f"[{style}]{p:6.1%}[/]")
    console.print(f"→ [bold]{pred['label']}[/] ({pred['score']:.1%} confident)")
    console.print(grid)
    if pred["truncated"]:
        console.print(f"[yellow]note: longer than {max_length} tokens; only the start was read[/]")


def _ask(predictor: Predictor, console: Console) -> Text | None:
    """One text (or pair) from the prompt; None when the user quits."""
    prompts = ("sentence 1> ", "sentence 2> ") if predictor.is_pair else ("> ",)
    texts = []
    for prompt in prompts:
        line = console.input(prompt)
        if not sys.stdin.isatty():
            console.print(line)  # piped input: show what was read, so the transcript reads well
        if line.strip() in QUIT:
            return None
        texts.append(line)
    return tuple(texts) if predictor.is_pair else texts[0]


def _interactive(predictor: Predictor, console: Console) -> int:
    console.print(f"[bold]lorakit predict[/] · {predictor.description}")
    what = "a sentence pair" if predictor.is_pair else "a sentence"
    console.print(f"Type {what} and press Enter; :q, Ctrl-D or Ctrl-C to leave.")
    try:
        while (text := _ask(predictor, console)) is not None:
            parts = (text,) if isinstance(text, str) else text
            if any(not t.strip() for t in parts):
                console.print("[yellow]empty input skipped: type a sentence, or :q to leave[/]")
                continue
            _show(console, predictor.predict([text])[0], predictor.max_length)
    except (EOFError, KeyboardInterrupt):
        console.print()
    console.print("bye")
    return 0


def _demo(predictor: Predictor, console: Console) -> int:
    from rich.table import Table

    from lorakit.predict import DEMO_PAIRS, DEMO_SENTENCES

    items: list[Text] = list(DEMO_PAIRS if predictor.is_pair else DEMO_SENTENCES)
    preds = predictor.predict(items)
    table = Table(title=f"lorakit demo · {predictor.description}", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("text", ratio=1, min_width=20)
    table.add_column("label", style="bold")
    table.add_column("confidence", no_wrap=True)
    table.add_column("probabilities")
    for i, (item, pred) in enumerate(zip(items, preds, strict=True), 1):
        text = item if isinstance(item, str) else " ‖ ".join(item)
        probs = "\n".join(f"{name} {p:.3f}" for name, p in pred["probs"].items())
        table.add_row(
            str(i), text, pred["label"], f"{_bar(pred['score'], 8)} {pred['score']:.0%}", probs
        )
    console.print(table)
    return 0


def _text(args: argparse.Namespace, predictor: Predictor, console: Console) -> int:
    if predictor.is_pair and args.text_pair is None:
        cols = ", ".join(predictor.text_columns)
        raise LoraKitError(f"this model labels sentence pairs ({cols}): pass --text_pair too")
    if not predictor.is_pair and args.text_pair is not None:
        raise LoraKitError("this model labels single texts: drop --text_pair")
    text: Text = (args.text, args.text_pair) if predictor.is_pair else args.text
    pred = predictor.predict([text])[0]
    if args.json:
        names = ("text", "text_pair")
        parts = (text,) if isinstance(text, str) else text
        print(json.dumps({**dict(zip(names, parts, strict=False)), **pred}, ensure_ascii=False))
    else:
        _show(console, pred, predictor.max_length)
    if pred["truncated"] and args.json:
        print(
            f"note: the text is longer than {predictor.max_length} tokens; truncated",
            file=sys.stderr,
        )
    return 0


def _file(args: argparse.Namespace, predictor: Predictor) -> int:
    from collections import Counter

    from lorakit.predict_files import predict_file, write_jsonl

    records, problems = predict_file(predictor, args.file, args.text_columns, progress=True)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not records:
        raise LoraKitError(f"{args.file}: no row could be labelled")
    cut = [r["line"] for r in records if r["truncated"]]
    if cut:
        lines = ", ".join(map(str, cut[:10])) + (" ..." if len(cut) > 10 else "")
        print(
            f"note: {len(cut)} row(s) longer than {predictor.max_length} tokens were truncated "
            f"(lines {lines})",
            file=sys.stderr,
        )
    counts = Counter(r["label"] for r in records)
    summary = f"{len(records)} labelled ({', '.join(f'{k} {v}' for k, v in counts.most_common())})"
    skipped = f"; {len(problems)} row(s) skipped, see above" if problems else ""
    if args.out is None:
        for record in records:
            print(json.dumps(record, ensure_ascii=False))
        print(summary + skipped, file=sys.stderr)
    else:
        write_jsonl(records, args.out)
        print(f"✅ {summary}, written to {args.out}{skipped}")
    return 0
