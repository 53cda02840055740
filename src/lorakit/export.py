"""Shipping an adapter without lorakit: a merged transformers directory, or an ONNX graph.

Both fold LoRA into the base weights (``W' = W + (alpha/rank)·BA``) and put plain layers back,
check the result against the unmerged model on sample sentences, and only then move it into
place, so a failed run never replaces a good earlier output.

ONNX layout (``--out model.onnx``)::

    model.onnx            the graph: inputs input_ids, attention_mask (, token_type_ids),
                          int64 (batch, sequence), both axes dynamic; output logits (batch, labels)
    model.json            id2label, max_length, text_columns, pad_token_id, base model, adapter
    model.tokenizer/      the base model's tokenizer (tokenizer.save_pretrained)
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from lorakit.atomic import atomic_dir, finish_tree, recover, replace_dir, sync_dir
from lorakit.data import (
    DEFAULT_MAX_LENGTH,
    adapter_text_columns,
    collate,
    encode_texts,
    eval_order,
)
from lorakit.errors import LoraKitError
from lorakit.onnx_int8 import DEFAULT_KEEP_FP32, quantize_int8
from lorakit.paths import check_writable
from lorakit.textfiles import read_texts

TOLERANCE = 1e-4  # largest |logit difference| accepted between the output and the unmerged model


def onnx_sidecar(path: Path) -> Path:
    """The json beside ``model.onnx``: ``model.json``."""
    return path.with_suffix(".json")


def onnx_tokenizer_dir(path: Path) -> Path:
    """The tokenizer folder beside ``model.onnx``: ``model.tokenizer/``."""
    return path.with_suffix(".tokenizer")


def _check_out(out: Path, overwrite: bool, kind: Literal["dir", "file"]) -> None:
    if kind == "file" and out.is_dir():
        raise LoraKitError(f"{out} is a directory; give a file name like model.onnx")
    if kind == "dir" and out.exists() and not out.is_dir():
        raise LoraKitError(f"{out} is a file; give a directory for the merged model")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise LoraKitError(f"{out} exists and is not empty; pass --overwrite to replace it")
    check_writable(out, kind)


def _sample_inputs(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """A padded batch of ``texts``, as evaluation and prediction build theirs."""
    batch = collate(
        encode_texts([(t,) for t in texts], tokenizer, max_length), np.arange(len(texts))
    )
    del batch["labels"]
    return batch


# Checked on texts of very different lengths, so padding and the attention mask are exercised.
CHECK_TEXTS = [
    "Fine.",
    "The plot is dull and the acting is even worse.",
    "The visuals are stunning, but the story falls completely flat.",
]
TRACE_TEXTS = ["Fine.", "Not good."]  # other shapes than CHECK_TEXTS: proves the axes dynamic


@torch.inference_mode()
def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    return model(**inputs).logits.float().numpy()


def _check_close(name: str, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.abs(got - want).max())
    if not diff <= TOLERANCE:  # also catches NaN
        raise LoraKitError(
            f"{name} differs from the unmerged model by {diff:.2e} (> {TOLERANCE:.0e}); "
            "nothing was written"
        )
    return diff


def _load_merged(
    adapter_dir: Path, model_name: str | None
) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, Any], dict[str, torch.Tensor], np.ndarray]:
    """The merged fp32 CPU model, plus sample inputs and the *unmerged* model's logits on them."""
    from lorakit.models import load_adapted_model
    from lorakit.state import unwrap_lora

    model, tokenizer, config = load_adapted_model(adapter_dir, model_name, torch.device("cpu"))
    inputs = _sample_inputs(tokenizer, CHECK_TEXTS, 32)
    reference = _logits(model, inputs)
    unwrap_lora(model)
    return model, tokenizer, config, inputs, reference


def merge_adapter(
    adapter_dir: Path, out: Path, model_name: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write a plain transformers directory (config, safetensors, tokenizer) with LoRA folded in.

    Returns:
        ``out`` and ``max_abs_diff``, the largest logit difference of the reloaded directory
        from the unmerged model on sample sentences.
    """
    _check_out(out, overwrite, "dir")
    model, tokenizer, config, inputs, reference = _load_merged(adapter_dir, model_name)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(str(tmp))
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=torch.float32)
        diff = _check_close("the merged model", _logits(reloaded.eval(), inputs), reference)
    return {"out": str(out), "max_abs_diff": diff}


def write_plain_lora(adapter_dir: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Write an rsLoRA or AdaLoRA adapter as the equivalent plain LoRA, for runtimes that know
    only LoRA: rsLoRA's alpha' = alpha·sqrt(r) (tensors unchanged), AdaLoRA's ``A ⊙ E`` with
    per-layer ranks (``lorakit.adalora.as_plain_lora``)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lorakit.adalora import as_plain_lora
    from lorakit.adapter import WEIGHTS_NAME
    from lorakit.adapter_config import (
        CONFIG_NAME,
        LORAKIT_NAME,
        plain_lora_config,
        read_adapter_config,
        read_json,
    )

    checked = read_adapter_config(adapter_dir)
    adalora = checked.get("peft_type") == "ADALORA"
    if not adalora and not checked.get("use_rslora"):
        raise LoraKitError(
            f"{adapter_dir} is neither an rsLoRA nor an AdaLoRA adapter: it is plain LoRA already"
        )
    _check_out(out, overwrite, "dir")
    raw = read_json(adapter_dir / CONFIG_NAME)
    with atomic_dir(out) as tmp:
        if adalora:
            try:
                config, state = as_plain_lora(raw, load_file(str(adapter_dir / WEIGHTS_NAME)))
            except ValueError as e:
                raise LoraKitError(f"{adapter_dir}: {e}") from None
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            config = plain_lora_config(raw)
            shutil.copyfile(adapter_dir / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if (adapter_dir / LORAKIT_NAME).is_file():
            shutil.copyfile(adapter_dir / LORAKIT_NAME, tmp / LORAKIT_NAME)
    return {"out": str(out), "lora_alpha": config["lora_alpha"]}


class _LogitsOnly(nn.Module):
    """The classifier with named tensor inputs and the logits tensor as its only output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def _export_graph(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    """torch.onnx's dynamo exporter with dynamic batch and sequence axes."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # The exporter logs and warns a lot about things that do not concern a BERT classifier.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _LogitsOnly(model).eval(),
            (),
            kwargs=inputs,
            dynamo=True,
            input_names=list(inputs),
            output_names=["logits"],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in inputs},
            verbose=False,
        )
    if program is None:
        raise LoraKitError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def read_onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session on ``path``; ``LoraKitError`` if missing or not ONNX."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise LoraKitError("ONNX needs onnxruntime: pip install 'lorakit[onnx]'") from None
    if not path.is_file():
        raise LoraKitError(f"ONNX file {path} does not exist")
    options = ort.SessionOptions()
    # No busy-waiting between calls: it starves torch and the tokenizer on small CPUs and,
    # measured on 2 cores, does not make onnxruntime any faster.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise LoraKitError(f"{path} is not a loadable ONNX model: {str(e)[:200]}") from None


CALIBRATION_ROWS = 256  # rows of --calibration the int8 sensitivity pass runs on


def _calibration_feeds(
    tokenizer: PreTrainedTokenizerBase,
    config: dict[str, Any],
    calibration: Path | None,
    names: set[str],
) -> list[dict[str, np.ndarray]]:
    """Batches for the int8 sensitivity pass: up to 256 rows of ``calibration`` (spread over
    the file), else the built-in check sentences."""
    if calibration is None:
        rows: list[tuple[str, ...]] = [(t,) for t in CHECK_TEXTS + TRACE_TEXTS]
    else:
        rows = read_texts(calibration, adapter_text_columns(config)).texts
        if not rows:
            raise LoraKitError(f"--calibration {calibration}: no usable rows")
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, CALIBRATION_ROWS).astype(int)]
        rows = list(dict.fromkeys(rows))
    data = encode_texts(rows, tokenizer, int(config.get("max_length") or DEFAULT_MAX_LENGTH))
    return [
        {k: v.numpy() for k, v in collate(data, idx).items() if k in names}
        for idx in eval_order(data.lengths, 64)
    ]


def export_onnx(
    adapter_dir: Path,
    out: Path,
    model_name: str | None = None,
    overwrite: bool = False,
    quantize: Literal["none", "int8"] = "none",
    calibration: Path | None = None,
    keep_fp32: int = DEFAULT_KEEP_FP32,
    on_node: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Export the merged classifier to ONNX and check it against torch with onnxruntime.

    The graph is traced on 2 short sentences and checked on 3 longer ones of mixed lengths,
    so the check also proves the batch and sequence axes dynamic. With ``quantize="int8"``
    the checked fp32 graph is then quantized by ``lorakit.onnx_int8.quantize_int8``: per-channel
    int8 weights, activations quantized per call, the ``keep_fp32`` matmuls most sensitive on
    the ``calibration`` rows (e.g. the training file) left fp32; ~4x smaller, faster on CPU,
    not bit-exact. Its logits must be finite and its differences are reported; ``on_node(i,
    n)`` follows the sensitivity pass.

    Returns:
        ``out``, ``max_abs_diff`` (fp32 onnxruntime vs the unmerged torch model) and, for
        int8, ``int8_max_abs_diff``, ``int8_labels_agree`` ("k/n" check sentences),
        ``int8_fp32_nodes`` and ``int8_logit_error`` (on the calibration rows).
    """
    _check_export_args(out, overwrite, quantize, calibration, keep_fp32)
    model, tokenizer, config, inputs, reference = _load_merged(adapter_dir, model_name)
    recover(onnx_tokenizer_dir(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    # The three files are staged together, then moved in one by one, the graph last.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp.", dir=out.parent) as staging:
        graph = Path(staging) / out.name
        _export_graph(model, _sample_inputs(tokenizer, TRACE_TEXTS, 8), graph)
        session = read_onnx_session(graph)
        names = {i.name for i in session.get_inputs()}
        feed = {k: v.numpy() for k, v in inputs.items() if k in names}
        diff = _check_close("the ONNX graph", session.run(None, feed)[0], reference)
        result: dict[str, Any] = {"out": str(out), "max_abs_diff": diff}
        if quantize == "int8":
            feeds = _calibration_feeds(tokenizer, config, calibration, names)
            result.update(_int8(graph, feeds, feed, reference, keep_fp32, on_node))
        tokenizer.save_pretrained(str(onnx_tokenizer_dir(graph)))
        meta = {**_sidecar(model, config, adapter_dir), "quantization": quantize}
        if quantize == "int8":
            meta["int8_fp32_nodes"] = result["int8_fp32_nodes"]
        onnx_sidecar(graph).write_text(json.dumps(meta, indent=2))
        _install(graph, out)
    return result


def _check_export_args(
    out: Path, overwrite: bool, quantize: str, calibration: Path | None, keep_fp32: int
) -> None:
    if quantize not in ("none", "int8"):
        raise LoraKitError(f"--quantize must be none or int8, got {quantize!r}")
    if keep_fp32 < 0:
        raise LoraKitError(f"--int8_keep_fp32 must be >= 0, got {keep_fp32}")
    if calibration is not None and not calibration.is_file():
        raise LoraKitError(f"--calibration {calibration}: no such file")
    if out.suffix != ".onnx":
        raise LoraKitError(f"--out must end in .onnx, got {out}")
    _check_out(out, overwrite, "file")


def _int8(
    graph: Path,
    feeds: list[dict[str, np.ndarray]],
    feed: dict[str, np.ndarray],
    reference: np.ndarray,
    keep_fp32: int,
    on_node: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """Quantize the checked fp32 ``graph`` in place; what ``export_onnx`` reports of it."""
    fp32_graph = graph.with_suffix(".fp32.onnx")
    graph.replace(fp32_graph)
    result = quantize_int8(fp32_graph, graph, feeds, keep_fp32, on_node)
    fp32_graph.unlink()
    logits = read_onnx_session(graph).run(None, feed)[0]
    if not np.isfinite(logits).all():
        raise LoraKitError("the int8 graph gives non-finite logits; export without it")
    agree = int((logits.argmax(-1) == reference.argmax(-1)).sum())
    result["int8_max_abs_diff"] = float(np.abs(logits - reference).max())
    result["int8_labels_agree"] = f"{agree}/{len(reference)}"
    return result


def _install(graph: Path, out: Path) -> None:
    """Move the staged graph, its sidecar and tokenizer beside ``out``: fsynced, with the
    umask's modes, the graph last (a predictor never finds a new graph beside an old
    sidecar)."""
    finish_tree(graph.parent)
    replace_dir(onnx_tokenizer_dir(graph), onnx_tokenizer_dir(out))
    onnx_sidecar(graph).replace(onnx_sidecar(out))
    graph.replace(out)
    sync_dir(out.parent)


def _sidecar(model: nn.Module, config: dict[str, Any], adapter_dir: Path) -> dict[str, Any]:
    model_config: Any = model.config
    return {
        "format": "lorakit-onnx",
        "id2label": {str(k): v for k, v in model_config.id2label.items()},
        "max_length": int(config.get("max_length") or DEFAULT_MAX_LENGTH),
        "text_columns": list(adapter_text_columns(config)),
        "pad_token_id": model_config.pad_token_id,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "adapter": str(adapter_dir),
        "task": config.get("task"),
    }
