"""int8 ONNX graphs close to the fp32 accuracy: per-channel weights, the most sensitive
matmuls left in fp32 (chosen by measurement).

Measured on the shipped SST-2 adapter (docs/benchmarks-log.md, int8): onnxruntime's default
dynamic quantization (one scale per weight tensor) lost 1.4 points of validation accuracy, one
scale per output channel 0.6. The sensitivity of MiniLM's matmuls is lopsided: six of them move
the logits 2-3x more than any other when quantized alone, and keeping those six in fp32
changed 1 label in 2,000 training rows (15 with none kept), which is how the default was
chosen (on training rows, not on the validation split it is reported on). Activations stay
dynamic (quantized per call): static scales were faster in onnxruntime's QOperator form but
lost a point on an earlier adapter.

The sensitivity pass quantizes each matmul alone and measures the mean absolute logit
change on the calibration rows: one quantization per matmul (~90 s for MiniLM's 38).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

Feeds = Sequence[dict[str, np.ndarray]]  # input batches: name -> int64 (batch, seq)
DEFAULT_KEEP_FP32 = 6  # chosen on training rows (docs/benchmarks-log.md, int8): 1 flip in 2,000


@contextmanager
def _quiet() -> Iterator[None]:
    # onnxruntime.quantization logs a pre-processing suggestion on the root logger per call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def matmuls(graph: Path) -> list[str]:
    """Names of the MatMul and Gemm nodes with a constant (weight) input, in graph order: the
    ones dynamic quantization turns int8 (products of two activations stay fp32)."""
    import onnx

    model = onnx.load(str(graph))
    weights = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and any(x in weights for x in n.input)
    ]


def _names(nodes: list[str]) -> list[str]:
    # onnxruntime first rewrites a Gemm as a MatMul named "<gemm>_MatMul" (plus an Add), and
    # matches nodes_to_quantize/nodes_to_exclude against that name.
    return [*nodes, *(f"{n}_MatMul" for n in nodes)]


def quantize_per_channel(
    graph: Path, out: Path, nodes: list[str] | None, exclude: list[str]
) -> None:
    """Dynamic int8 with one weight scale per output channel: ``nodes`` (None: every matmul
    of ``matmuls``) but not ``exclude``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            graph,
            out,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=None if nodes is None else _names(nodes),
            nodes_to_exclude=_names(exclude),
        )


def _logits(graph: Path, feeds: Feeds) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, dict(f))[0] for f in feeds])


def sensitivity(
    graph: Path,
    feeds: Feeds,
    on_node: Callable[[int, int], None] | None = None,
    reference: np.ndarray | None = None,
) -> dict[str, float]:
    """Each matmul's mean |logit change| on ``feeds`` when it alone is int8 (``reference``:
    the fp32 graph's logits on ``feeds``, if already computed)."""
    if reference is None:
        reference = _logits(graph, feeds)
    nodes = matmuls(graph)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-int8-") as tmp:
        one = Path(tmp) / "one.onnx"
        for i, node in enumerate(nodes):
            quantize_per_channel(graph, one, [node], [])
            out[node] = float(np.abs(_logits(one, feeds) - reference).mean())
            if on_node is not None:
                on_node(i + 1, len(nodes))
    return out


def quantize_int8(
    graph: Path,
    out: Path,
    feeds: Feeds,
    keep_fp32: int = DEFAULT_KEEP_FP32,
    on_node: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the int8 graph of ``graph`` to ``out``: per-channel int8 weights, dynamic int8
    activations, the ``keep_fp32`` most sensitive matmuls (on ``feeds``) left fp32.

    Returns ``int8_fp32_nodes`` (kept in fp32, most sensitive first) and ``int8_logit_error``
    (mean |logit change| of the whole int8 graph on ``feeds``).
    """
    reference = _logits(graph, feeds)
    keep: list[str] = []
    if keep_fp32 > 0:
        scores = sensitivity(graph, feeds, on_node, reference)
        keep = sorted(scores, key=lambda n: -scores[n])[:keep_fp32]
    quantize_per_channel(graph, out, None, keep)
    error = float(np.abs(_logits(out, feeds) - reference).mean())
    return {"int8_fp32_nodes": keep, "int8_logit_error": error}
