"""``lorakit export``: flags for ``export_onnx``; prints where the checked graph went."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.commands.flags import add_bool_flag
from lorakit.errors import LoraKitError
from lorakit.onnx_int8 import DEFAULT_KEEP_FP32

HELP = "export the merged model to ONNX (dynamic batch and sequence), checked with onnxruntime"
EPILOG = """\
--out model.onnx writes three things side by side:
  model.onnx        inputs input_ids, attention_mask (and token_type_ids for BERT), int64
                    (batch, sequence), both axes dynamic; output logits (batch, num_labels)
  model.json        id2label, max_length, text_columns, pad_token_id, base model, adapter
  model.tokenizer/  the base model's tokenizer
`lorakit predict --onnx model.onnx` reads all three. The graph is compared with the unmerged
torch model on sample sentences; a largest logit difference above 1e-4 is an error and
nothing is written. With --quantize int8 that checked graph is then quantized: int8
weights with one scale per output channel, activations quantized per call, and the
--int8_keep_fp32 matmuls whose quantization moves the logits most (measured one by one on
the --calibration rows, e.g. your training file) kept in fp32; its differences are reported.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--adapter",
        type=Path,
        required=True,
        metavar="DIR",
        help="adapter directory or Hub id (owner/name)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="the .onnx file to write"
    )
    parser.add_argument("--model", help="base model (default: the adapter's)")
    parser.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: int8 weights and activations, ~4x smaller and faster on CPU, within a few "
        "tenths of a point of fp32 accuracy (default: none)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="rows (.txt/.csv/.tsv/.jsonl, e.g. the training file) that choose which matmuls "
        "stay fp32 with --quantize int8 (default: a few built-in sentences)",
    )
    parser.add_argument(
        "--int8_keep_fp32",
        type=int,
        default=DEFAULT_KEEP_FP32,
        metavar="N",
        help=f"with --quantize int8: keep the N most sensitive matmuls in fp32 "
        f"(default: {DEFAULT_KEEP_FP32}; 0 skips the ~1 minute sensitivity pass)",
    )
    add_bool_flag(parser, "overwrite", "replace an existing --out", default=False)


def run(args: argparse.Namespace) -> int:
    from lorakit.extras import require_extra

    require_extra("onnx", "lorakit export")  # first: torch.onnx fails late and deep without it
    from transformers.utils import logging as hf_logging

    from lorakit.export import export_onnx, onnx_sidecar, onnx_tokenizer_dir

    hf_logging.disable_progress_bar()
    if args.calibration is not None and args.quantize != "int8":
        raise LoraKitError("--calibration only applies with --quantize int8")

    def on_node(i: int, n: int) -> None:
        end = "\n" if i == n else ""
        print(f"\r   int8: measuring each matmul's sensitivity {i}/{n}", end=end, flush=True)

    result = export_onnx(
        args.adapter,
        args.out,
        args.model,
        args.overwrite,
        args.quantize,
        args.calibration,
        args.int8_keep_fp32,
        on_node,
    )
    out = Path(result["out"])
    print(f"✅ ONNX graph written to {out} (+ {onnx_sidecar(out)}, {onnx_tokenizer_dir(out)}/)")
    print(
        f"   largest |onnxruntime - torch| logit difference: {result['max_abs_diff']:.2e} (≤ 1e-4)"
    )
    if "int8_max_abs_diff" in result:
        print(
            f"   int8: largest logit difference {result['int8_max_abs_diff']:.2e}, labels agree "
            f"on {result['int8_labels_agree']} check sentences; "
            f"{len(result['int8_fp32_nodes'])} matmul(s) kept fp32; check its accuracy with "
            f"`lorakit eval --onnx {out}`"
        )
    return 0
