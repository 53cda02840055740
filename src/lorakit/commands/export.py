"""``lorakit export``: flags for ``export_onnx``; prints where the checked graph went."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.cli import add_bool_flag

HELP = "export the merged model to ONNX (dynamic batch and sequence), checked with onnxruntime"
EPILOG = """\
--out model.onnx writes three things side by side:
  model.onnx        inputs input_ids, attention_mask (and token_type_ids for BERT), int64
                    (batch, sequence), both axes dynamic; output logits (batch, num_labels)
  model.json        id2label, max_length, text_columns, pad_token_id, base model, adapter
  model.tokenizer/  the base model's tokenizer
`lorakit predict --onnx model.onnx` reads all three. The graph is compared with the unmerged
torch model on sample sentences; a largest logit difference above 1e-4 is an error and
nothing is written. With --quantize int8 that checked graph is then quantized
(int8 weights, activations quantized per call) and its differences are reported.
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
        help="int8: dynamic int8 weights, ~4x smaller and faster on CPU, not bit-exact "
        "(default: none)",
    )
    add_bool_flag(parser, "overwrite", "replace an existing --out", default=False)


def run(args: argparse.Namespace) -> int:
    from lorakit.extras import require_extra

    require_extra("onnx", "lorakit export")  # first: torch.onnx fails late and deep without it
    from transformers.utils import logging as hf_logging

    from lorakit.export import export_onnx, onnx_sidecar, onnx_tokenizer_dir

    hf_logging.disable_progress_bar()
    result = export_onnx(args.adapter, args.out, args.model, args.overwrite, args.quantize)
    out = Path(result["out"])
    print(f"✅ ONNX graph written to {out} (+ {onnx_sidecar(out)}, {onnx_tokenizer_dir(out)}/)")
    print(
        f"   largest |onnxruntime - torch| logit difference: {result['max_abs_diff']:.2e} (≤ 1e-4)"
    )
    if "int8_max_abs_diff" in result:
        print(
            f"   int8: largest logit difference {result['int8_max_abs_diff']:.2e}, labels agree "
            f"on {result['int8_labels_agree']} check sentences; check its accuracy with "
            f"`lorakit eval --onnx {out}`"
        )
    return 0
