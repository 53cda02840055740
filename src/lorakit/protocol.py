"""The server's wire protocol: requests read, responses and errors written, in one place.

- TEI's ``POST /predict``: ``inputs`` is a text, a ``[text_a, text_b]`` pair, or a batch of
  1- or 2-element lists; the answer is every label as ``{label, score}``, highest first (a list
  of such lists for a batch). Errors are ``{"error": ..., "error_type": ...}`` with TEI's codes.
- The Hugging Face Inference API's ``POST /models/{name}``: ``{"inputs": text | [texts] |
  {"text", "text_pair"}, "parameters": {"top_k", "function_to_apply"}}`` answered with a list
  of lists.
- vLLM's adapter management bodies: ``{"lora_name", "lora_path"}``.

The pydantic models below say the same in JSON Schema for the OpenAPI document; the readers
(``read_tei``, ``read_hf``, ``adapter_request``) enforce it with TEI's statuses and messages,
which pydantic's errors would not give. tests/test_openapi.py fuzzes a real server against
the document, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import models_json_schema

Row = tuple[str, ...]  # one text, or a sentence pair
MAX_PATH = 4096  # characters of a lora_path (Linux's PATH_MAX)

# The characters str.isspace() holds, which str.strip() removes (tests/test_openapi.py checks).
SPACE = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = f"[^{SPACE}]"  # somewhere in a text: what a blank one (422 "empty") lacks


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
    if isinstance(inputs, dict):  # "text" is required; a "text_pair" beside it makes a pair
        text = _text(inputs.get("text"), "inputs.text")
        pair = inputs.get("text_pair")
        row: Row = (text,) if pair is None else (text, _text(pair, "inputs.text_pair"))
        rows, batch = [row], False
    elif isinstance(inputs, list):
        if not inputs:
            raise ApiError(422, "empty", "inputs is an empty list")
        rows, batch = [(_text(v, f"inputs[{i}]"),) for i, v in enumerate(inputs)], True
    else:
        rows, batch = [(_text(inputs, "inputs"),)], False
    params = body.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise validation("parameters must be an object")
    top_k = params.get("top_k")
    if isinstance(top_k, float) and top_k.is_integer():  # 2.0 is an integer to JSON Schema
        top_k = int(top_k)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise validation("parameters.top_k must be a positive integer")
    function = params.get("function_to_apply")
    function = "softmax" if function is None else function
    if not isinstance(function, str) or function.lower() not in ("softmax", "sigmoid", "none"):
        raise validation("parameters.function_to_apply must be softmax, sigmoid or none")
    return HfRequest(rows, batch, top_k, function.lower())


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


# -- the same bodies as JSON Schema, for the OpenAPI document ---------------------------------

Text = Annotated[
    str, Field(pattern=NOT_BLANK, description="a text; one of only spaces is answered 422 empty")
]
TextRow = Annotated[list[Text], Field(min_length=1, max_length=2)]  # [text] or [text_a, text_b]


class PredictBatch(RootModel[Annotated[list[TextRow], Field(min_length=1)]]):
    """A batch: one ``[text]`` or ``[text_a, text_b]`` per row; at most --max_client_batch_size
    rows (413 past it)."""


class PredictBody(BaseModel):
    """TEI's ``POST /predict`` body, plus lorakit's ``adapter``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"inputs": "the movie was good"},
                {"inputs": [["fine"], ["not a great film"]], "raw_scores": True},
            ]
        }
    )

    inputs: Text | TextRow | PredictBatch = Field(
        description="a text, a [text] or a [text_a, text_b] pair (answered with one list), or a "
        "batch (answered with a list per row); the adapter decides whether it takes pairs"
    )
    raw_scores: bool | None = Field(False, description="the logits instead of probabilities")
    truncate: bool | None = Field(
        None,
        description="cut texts past the adapter's max_length tokens instead of answering 413; "
        "null: the server's --auto_truncate",
    )
    truncation_direction: str = Field(
        "right",
        pattern=r"^(?:[Rr][Ii][Gg][Hh][Tt]|[Ll][Ee][Ff][Tt])$",
        description="which end truncate cuts: right or left, in any case",
    )
    adapter: str | None = Field(
        None, description="the adapter to run; null, empty or absent: the server's default"
    )


class TextPair(BaseModel):
    """The Inference API's sentence pair."""

    text: Text
    text_pair: Text | None = None


class InferenceBatch(RootModel[Annotated[list[Text], Field(min_length=1)]]):
    """Texts to classify one by one; at most --max_client_batch_size (413 past it)."""


class InferenceParameters(BaseModel):
    """The Inference API's text-classification parameters."""

    top_k: int | None = Field(None, ge=1, description="only the k highest labels; null: all")
    function_to_apply: str | None = Field(
        None,
        pattern=r"^(?:[Ss][Oo][Ff][Tt][Mm][Aa][Xx]|[Ss][Ii][Gg][Mm][Oo][Ii][Dd]|[Nn][Oo][Nn][Ee])$",
        description="softmax, sigmoid or none (the logits), in any case; null: softmax",
    )


class InferenceBody(BaseModel):
    """The Hugging Face Inference API's text-classification body."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"inputs": "the movie was good", "parameters": {"top_k": 1}}]
        }
    )

    inputs: Text | InferenceBatch | TextPair
    parameters: InferenceParameters | None = None


class LoadAdapterBody(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"lora_name": "sst2-v2", "lora_path": "sst2-v2"}]}
    )

    lora_name: str = Field(
        pattern=f"^[^.]*[^.{SPACE}][^.]*$",
        description="the name requests will use: no '.', and none of the attribute names of "
        "torch's ModuleDict, which keeps each layer's adapters (422 otherwise)",
    )
    lora_path: str = Field(
        max_length=MAX_PATH,
        pattern=f"^[^\\u0000]*[^\\u0000{SPACE}][^\\u0000]*$",
        description="the adapter's directory, relative to --adapter_dir and inside it (403 "
        "outside), without NUL characters",
    )


class UnloadAdapterBody(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    lora_name: str = Field(pattern=NOT_BLANK)


REQUESTS = (PredictBody, InferenceBody, LoadAdapterBody, UnloadAdapterBody)


def request_schemas(max_batch: int, reserved: list[str]) -> dict[str, Any]:
    """The request bodies' schemas by name, with the server's --max_client_batch_size and the
    names an adapter cannot have (``serve.reserved_names``)."""
    _, top = models_json_schema(
        [(m, "validation") for m in REQUESTS], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = top["$defs"]
    for name in ("PredictBatch", "InferenceBatch"):
        schemas[name]["maxItems"] = max_batch
    schemas["LoadAdapterBody"]["properties"]["lora_name"]["not"] = {"enum": reserved}
    return schemas


class ErrorBody(BaseModel):
    """TEI's error body, the answer to every request that fails."""

    error: str
    error_type: str = Field(
        description="validation, empty, not_found, forbidden, overloaded, backend, unhealthy "
        "or method_not_allowed"
    )


class Prediction(BaseModel):
    label: str
    score: float


class Predictions(RootModel[list[Prediction] | list[list[Prediction]]]):
    """Every label, highest score first; a list of such lists for a batch."""


class InferencePredictions(RootModel[list[list[Prediction]]]):
    """Every label (the top_k highest), highest score first, one list per text."""


class AdapterInfo(BaseModel):
    """A loaded adapter, as ``ServedAdapter.describe`` gives it."""

    id: str
    labels: list[str]
    text_columns: list[str] = Field(description="one name per text: two for sentence pairs")
    task: str | None
    max_length: int
    ranks: list[int]
    variant: str


class AdapterList(BaseModel):
    default: str | None = Field(description="the adapter requests without one use")
    data: list[AdapterInfo]


class Unloaded(BaseModel):
    unloaded: str


class Health(BaseModel):
    status: Literal["ok"]


class Classifier(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class ModelType(BaseModel):
    classifier: Classifier


class Info(BaseModel):
    """TEI's ``/info`` (the default adapter's labels), then ``/v1/adapters``' fields."""

    model_config = ConfigDict(protected_namespaces=())  # TEI's model_* names

    model_id: str
    model_sha: str | None
    model_dtype: str
    precision: str
    quantize_base: str = Field(description="the shared base's storage: none, nf4 or int8")
    model_type: ModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None
    default: str | None
    data: list[AdapterInfo]
