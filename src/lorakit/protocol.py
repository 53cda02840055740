"""The server's wire protocol: requests read, responses and errors written, in one place.

- TEI's ``POST /predict``: ``inputs`` is a text, a ``[text_a, text_b]`` pair, or a batch of
  1- or 2-element lists; the answer is every label as ``{label, score}``, highest first (a list
  of such lists for a batch). Errors are ``{"error": ..., "error_type": ...}`` with TEI's codes.
- The Hugging Face Inference API's ``POST /models/{name}``: ``{"inputs": text | [texts],
  "parameters": {"top_k", "function_to_apply"}}`` answered with a list of lists.
- vLLM's adapter management bodies: ``{"lora_name", "lora_path"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Row = tuple[str, ...]  # one text, or a sentence pair


class ApiError(Exception):
    """An error answered as TEI's JSON error body with an HTTP status."""

    def __init__(self, status: int, error_type: str, message: str, close: bool = False) -> None:
        # A message may quote the request; a lone surrogate in it could not be sent as UTF-8.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message
        self.close = close  # the connection must end (the rest of the body was not read)

    def response_headers(self) -> dict[str, str]:
        return {"Connection": "close"} if self.close else {}

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


def validation(message: str, status: int = 422) -> ApiError:
    return ApiError(status, "validation", message)


@dataclass
class PredictRequest:
    """TEI's predict request, plus lorakit's ``adapter``."""

    rows: list[Row]
    batch: bool  # answer with a list of lists
    adapter: str | None
    raw_scores: bool = False
    truncate: bool | None = None  # None: the server's --auto_truncate decides
    truncation_direction: str = "right"


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise validation(f"{where} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, no character
        raise validation(f"{where} is not valid Unicode (it holds a lone surrogate)") from None
    if not value.strip():
        raise ApiError(422, "empty", f"{where} is empty: there is nothing to classify")
    return value


def _row(value: Any, where: str) -> Row:
    if isinstance(value, str):
        return (_text(value, where),)
    if isinstance(value, list) and len(value) in (1, 2):
        return tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise validation(f"{where} must be a string or a list of one or two strings")


def read_tei(body: Any) -> PredictRequest:
    """TEI's ``/predict`` body; ``ApiError`` (422) when it is not one."""
    if not isinstance(body, dict) or "inputs" not in body:
        raise validation('the body must be a JSON object with "inputs"')
    inputs = body["inputs"]
    if isinstance(inputs, list) and inputs and all(isinstance(v, list) for v in inputs):
        rows, batch = [_row(v, f"inputs[{i}]") for i, v in enumerate(inputs)], True
    elif isinstance(inputs, list) and all(isinstance(v, str) for v in inputs):
        if len(inputs) not in (1, 2):
            raise validation(
                "inputs must be a string, a pair [string, string] or a batch "
                "[[string], [string, string], ...]"
            )
        rows, batch = [_row(inputs, "inputs")], False
    else:
        rows, batch = [_row(inputs, "inputs")], False
    direction = body.get("truncation_direction", "right")
    if isinstance(direction, str):
        direction = direction.lower()
    if direction not in ("right", "left"):
        raise validation("truncation_direction must be right or left")
    for key in ("raw_scores", "truncate"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise validation(f"{key} must be true or false")
    adapter = body.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise validation("adapter must be a string")
    return PredictRequest(
        rows=rows,
        batch=batch,
        adapter=adapter,
        raw_scores=bool(body.get("raw_scores", False)),
        truncate=body.get("truncate"),
        truncation_direction=direction,
    )


@dataclass
class HfRequest:
    """The Hugging Face Inference API's text-classification request."""

    rows: list[Row]
    batch: bool
    top_k: int | None
    function: str  # softmax, sigmoid or none


def read_hf(body: Any) -> HfRequest:
    """``{"inputs": text | [texts] | {"text", "text_pair"}, "parameters": {...}}``."""
    if not isinstance(body, dict) or "inputs" not in body:
        raise validation('the body must be a JSON object with "inputs"')
    inputs = body["inputs"]
    if isinstance(inputs, dict):
        pair = [inputs.get("text"), inputs.get("text_pair")]
        rows, batch = [_row([p for p in pair if p is not None], "inputs")], False
    elif isinstance(inputs, list):
        if not inputs:
            raise ApiError(422, "empty", "inputs is an empty list")
        rows, batch = [(_text(v, f"inputs[{i}]"),) for i, v in enumerate(inputs)], True
    else:
        rows, batch = [(_text(inputs, "inputs"),)], False
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise validation("parameters must be an object")
    top_k = params.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise validation("parameters.top_k must be a positive integer")
    function = str(params.get("function_to_apply") or "softmax").lower()
    if function not in ("softmax", "sigmoid", "none"):
        raise validation("parameters.function_to_apply must be softmax, sigmoid or none")
    return HfRequest(rows, batch, top_k, function)


def scores(logits: np.ndarray, function: str) -> np.ndarray:
    """Probabilities (softmax, sigmoid) or the raw logits (none) of one row."""
    if function == "none":
        return logits
    if function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max())
    return e / e.sum()


def ranked(values: np.ndarray, labels: tuple[str, ...], top_k: int | None = None) -> list[dict]:
    """Every label with its score, highest first (the first ``top_k`` when given)."""
    order = np.argsort(-values, kind="stable")[: top_k or None]
    return [{"label": labels[i], "score": float(values[i])} for i in order]


def adapter_request(body: Any, *keys: str) -> dict[str, str]:
    """vLLM's adapter-management body: string fields ``keys``; ``ApiError`` (422) otherwise."""
    if not isinstance(body, dict):
        raise validation("the body must be a JSON object")
    out = {}
    for key in keys:
        value = body.get(key)
        if not isinstance(value, str) or not value.strip():
            raise validation(f"{key} must be a non-empty string")
        out[key] = value
    return out
