"""``lorakit serve``: many adapters over one base model behind an HTTP API real clients speak.

Routes (the wire formats are in ``lorakit.protocol``):

    POST /predict                 TEI's classification API; ``"adapter"`` picks the adapter
    POST /models/{name}           the Hugging Face Inference API (huggingface_hub's client)
    GET  /v1/adapters             the loaded adapters
    POST /v1/load_lora_adapter    vLLM's shape; reads only inside --adapter_dir
    POST /v1/unload_lora_adapter  waits for the adapter's requests in flight, then unloads
    GET  /health, /info, /metrics TEI's, plus the adapters; Prometheus text
    GET  /                        a page to try the adapters in a browser
    GET  /openapi.json, /docs     every body, success and error status above, and Swagger UI

Handlers validate and tokenize, then enqueue rows for the ``Batcher``'s worker thread; a
request over ``max_concurrent_requests`` is answered 429 at once. The server keeps no state
but its adapter set, so replicas behind a load balancer need nothing shared.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import Counter as PromCounter
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from lorakit.batcher import Batcher, Row
from lorakit.errors import LoraKitError
from lorakit.multi import AdapterSet, ServedAdapter
from lorakit.protocol import (
    MAX_PATH,
    AdapterInfo,
    AdapterList,
    ApiError,
    ErrorBody,
    Health,
    InferencePredictions,
    Info,
    Predictions,
    Unloaded,
    adapter_request,
    ranked,
    read_hf,
    read_tei,
    request_schemas,
    scores,
    validation,
)
from lorakit.runtime import precision_name

INLINE_CHARS = 2048  # a request's characters tokenized on the event loop itself (Server.tokenize)


@dataclass
class ServeSettings:
    """The server's flags, with TEI's names and defaults where TEI has them."""

    model: str = ""  # "": the first adapter's base model (minilm with --adapter_dir alone)
    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, directory)
    adapter_dir: str | None = None  # the only place runtime loads may read from
    default_adapter: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    max_input_length: int | None = None  # default: the model's positions
    auto_truncate: bool = False
    payload_limit: int = 2_000_000  # bytes, TEI's default
    precision: str = "auto"  # auto: bf16 where the hardware runs it fast (runtime.amp_dtype)
    quantize_base: str | None = None  # nf4, int8, none; None: as the first adapter was trained


class Metrics:
    """Prometheus series, named for what they count (TEI's set, per adapter)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PromCounter(
            "lorakit_request_count", "Requests received", ["adapter", "route"], registry=r
        )
        self.failures = PromCounter(
            "lorakit_request_failure", "Requests that failed", ["adapter", "error_type"], registry=r
        )
        self.inputs = PromCounter(
            "lorakit_request_inputs", "Texts (or pairs) classified", ["adapter"], registry=r
        )
        self.latency = Histogram(
            "lorakit_request_duration_seconds",
            "Time from request to response",
            ["adapter"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_size = Histogram(
            "lorakit_batch_size",
            "Rows per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "lorakit_batch_tokens",
            "Padded tokens per forward pass",
            buckets=(64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.forward = Histogram(
            "lorakit_batch_duration_seconds", "Forward pass time per batch", registry=r
        )
        self.queue = Gauge("lorakit_queue_size", "Rows waiting for a batch", registry=r)
        self.in_flight = Gauge("lorakit_requests_in_flight", "Requests being served", registry=r)
        self.adapters = Gauge("lorakit_adapters_loaded", "Adapters loaded", registry=r)

    def batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_tokens.observe(tokens)
        self.forward.observe(seconds)


class Server:
    """The adapters, the batcher and the bookkeeping every route shares."""

    def __init__(self, settings: ServeSettings, adapters: AdapterSet) -> None:
        self.settings = settings
        self.adapters = adapters
        self.metrics = Metrics()
        self.batcher = Batcher(
            adapters, settings.max_batch_tokens, settings.max_batch_requests, self.metrics.batch
        )
        self.default = settings.default_adapter or next(iter(adapters.adapters), None)
        self.in_flight = 0
        self.per_adapter: Counter[str] = Counter()  # requests in flight per adapter
        self.draining: set[str] = set()  # being unloaded: new requests are refused
        limit = getattr(adapters.model.config, "max_position_embeddings", None) or 512
        self.max_input_length = min(settings.max_input_length or limit, limit)
        self.metrics.adapters.set(len(adapters.adapters))
        # Large requests are tokenized on a thread of their own (infinity's pre-processing
        # stage), so the event loop keeps accepting and answering while long texts are cut up;
        # one thread, as encode sets the shared tokenizer's truncation side per call.
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="lorakit-tokenize")

    # -- shared steps -----------------------------------------------------------------------

    def adapter(self, name: str | None) -> ServedAdapter:
        name = name or self.default
        if name is None or name not in self.adapters.adapters or name in self.draining:
            known = ", ".join(a for a in self.adapters.adapters if a not in self.draining)
            raise ApiError(
                404, "not_found", f"adapter {name!r} is not loaded; loaded: {known or 'none'}"
            )
        return self.adapters.adapters[name]

    def encode(
        self, adapter: ServedAdapter, rows: list[tuple[str, ...]], truncate: bool | None, side: str
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Token ids per row, cut at the adapter's max_length; too long and no truncate: 413."""
        pair = len(adapter.text_columns) == 2
        for row in rows:
            if (len(row) == 2) != pair:
                kind = "sentence pairs" if pair else "single texts"
                raise validation(
                    f"adapter {adapter.name!r} classifies {kind}, got {len(row)} text(s)"
                )
        cut = self.settings.auto_truncate if truncate is None else truncate
        limit = min(adapter.max_length, self.max_input_length)
        tokenizer = self.adapters.tokenizer
        columns = list(zip(*rows, strict=True))
        side_before = tokenizer.truncation_side
        tokenizer.truncation_side = side
        try:  # one pass; the encodings say which rows it had to cut
            out = tokenizer(*columns, truncation=True, max_length=limit)
        finally:
            tokenizer.truncation_side = side_before
        if not cut:
            if out.encodings is not None:
                over = [i for i, e in enumerate(out.encodings) if e.overflowing]
            else:
                over = list(range(len(rows)))
            longest = max((len(tokenizer(*rows[i])["input_ids"]) for i in over), default=0)
            if longest > limit:
                raise ApiError(
                    413,
                    "validation",
                    f"input validation error: inputs must have at most {limit} tokens, given "
                    f'{longest}; pass "truncate": true to cut them',
                )
        types = out.get("token_type_ids")
        return [
            (
                np.asarray(ids, dtype=np.int64),
                np.asarray(types[i], dtype=np.int64) if types else None,
            )
            for i, ids in enumerate(out["input_ids"])
        ]

    async def tokenize(
        self, adapter: ServedAdapter, rows: list[tuple[str, ...]], truncate: bool | None, side: str
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """``encode``: inline for a request of at most ``INLINE_CHARS`` characters (a
        sentence or a few, well under a millisecond), else on the tokenizing thread. The hop
        to the thread and back cost 15% of requests/s with 16 clients of one sentence each on 2
        cores (docs/benchmarks-log.md, the core refactor's A/B), where the loop saves nothing.
        """
        if sum(len(text) for row in rows for text in row) <= INLINE_CHARS:
            return self.encode(adapter, rows, truncate, side)
        loop = asyncio.get_running_loop()
        work = functools.partial(self.encode, adapter, rows, truncate, side)
        return await loop.run_in_executor(self.tokenizing, work)

    async def classify(
        self, adapter: ServedAdapter, encoded: list[tuple[np.ndarray, np.ndarray | None]]
    ) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        rows = [Row(adapter.name, ids, types, loop.create_future(), loop) for ids, types in encoded]
        self.batcher.submit(rows)
        self.metrics.queue.set(self.batcher.queue_size())
        try:
            return list(await asyncio.gather(*(r.future for r in rows)))
        except Exception as e:  # noqa: BLE001 - the model failed on this batch
            raise ApiError(424, "backend", f"the model failed: {type(e).__name__}: {e}") from None

    async def run(self, route: str, adapter_name: str | None, work: Any) -> Response:
        """Count, limit and time one request; turn ``ApiError`` into TEI's error body."""
        start = time.perf_counter()
        name = adapter_name or self.default
        # Metric labels only for loaded adapters: clients cannot invent time series.
        label = name if name in self.adapters.adapters else "unknown"
        self.metrics.requests.labels(label, route).inc()
        if self.in_flight >= self.settings.max_concurrent_requests:
            error = ApiError(429, "overloaded", "model is overloaded: too many requests in flight")
            self.metrics.failures.labels(label, error.error_type).inc()
            return error_response(error)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self.per_adapter[label] += 1
        try:
            return JSONResponse(await work())
        except ApiError as e:
            self.metrics.failures.labels(label, e.error_type).inc()
            return error_response(e)
        finally:
            self.in_flight -= 1
            self.per_adapter[label] -= 1
            self.metrics.in_flight.set(self.in_flight)
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)

    # -- routes -----------------------------------------------------------------------------

    async def predict(self, body: Any) -> Any:
        req = read_tei(body)
        if len(req.rows) > self.settings.max_client_batch_size:
            raise validation(
                f"batch size {len(req.rows)} > maximum allowed batch size "
                f"{self.settings.max_client_batch_size}",
                413,
            )
        adapter = self.adapter(req.adapter)
        encoded = await self.tokenize(adapter, req.rows, req.truncate, req.truncation_direction)
        logits = await self.classify(adapter, encoded)
        self.metrics.inputs.labels(adapter.name).inc(len(req.rows))
        function = "none" if req.raw_scores else "softmax"
        out = [ranked(scores(row, function), adapter.labels) for row in logits]
        return out if req.batch else out[0]

    async def hf_inference(self, name: str | None, body: Any) -> Any:
        req = read_hf(body)
        if len(req.rows) > self.settings.max_client_batch_size:
            raise validation(
                f"batch size {len(req.rows)} > maximum allowed batch size "
                f"{self.settings.max_client_batch_size}",
                413,
            )
        adapter = self.adapter(name)
        truncate = self.settings.auto_truncate or None
        encoded = await self.tokenize(adapter, req.rows, truncate, "right")
        logits = await self.classify(adapter, encoded)
        self.metrics.inputs.labels(adapter.name).inc(len(req.rows))
        return [ranked(scores(row, req.function), adapter.labels, req.top_k) for row in logits]

    def _adapter_path(self, given: str) -> Path:
        """``given`` resolved inside --adapter_dir (symlinks followed); anything else: 403."""
        if not self.settings.adapter_dir:
            raise ApiError(
                403,
                "forbidden",
                "runtime adapter loading is off; start the server with --adapter_dir",
            )
        if "\x00" in given or len(given) > MAX_PATH:
            raise validation(f"lora_path must be a path of at most {MAX_PATH} characters")
        root = Path(self.settings.adapter_dir).resolve()
        try:
            path = (root / given).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # too long a name, a symlink loop
            raise validation(f"lora_path {given!r} cannot be resolved: {e}") from None
        if path != root and root not in path.parents:
            raise ApiError(403, "forbidden", f"lora_path {given!r} is outside --adapter_dir")
        return path

    async def load(self, body: Any) -> Any:
        req = adapter_request(body, "lora_name", "lora_path")
        name = req["lora_name"]
        if problem := name_problem(name):
            raise validation(f"lora_name {name!r} is not a name for an adapter: {problem}")
        if name in self.adapters.adapters:
            raise ApiError(400, "validation", f"an adapter named {name!r} is already loaded")
        path = self._adapter_path(req["lora_path"])
        try:
            served = await asyncio.to_thread(self.adapters.load, name, path)
        except (LoraKitError, OSError) as e:  # OSError: a name too long for the file system
            raise ApiError(422, "validation", str(e)) from None
        self.default = self.default or name
        self.metrics.adapters.set(len(self.adapters.adapters))
        return served.describe()

    async def unload(self, body: Any) -> Any:
        name = adapter_request(body, "lora_name")["lora_name"]
        self.adapter(name)  # 404 if unknown or already going
        self.draining.add(name)
        try:
            while self.per_adapter[name] > 0:  # requests in flight finish first
                await asyncio.sleep(0.01)
            await asyncio.to_thread(self.adapters.unload, name)
        finally:
            self.draining.discard(name)
        if self.default == name:
            self.default = next(iter(self.adapters.adapters), None)
        self.metrics.adapters.set(len(self.adapters.adapters))
        return {"unloaded": name}

    def listing(self) -> dict[str, Any]:
        return {
            "default": self.default,
            "data": [
                a.describe() for a in self.adapters.adapters.values() if a.name not in self.draining
            ],
        }

    def info(self) -> dict[str, Any]:
        from lorakit.adapter import lorakit_version

        default = self.adapters.adapters.get(self.default or "")
        labels = default.labels if default else ()
        s = self.settings
        return {
            "model_id": self.adapters.model_name,
            "model_sha": None,
            # what the matmuls run in (weights stay fp32 under bf16 autocast)
            "model_dtype": str(self.adapters.amp or torch.float32).replace("torch.", ""),
            "precision": precision_name(self.adapters.amp),
            "quantize_base": self.adapters.quantize_base,
            "model_type": {
                "classifier": {
                    "id2label": {str(i): label for i, label in enumerate(labels)},
                    "label2id": {label: i for i, label in enumerate(labels)},
                }
            },
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_input_length": self.max_input_length,
            "max_batch_tokens": s.max_batch_tokens,
            "max_batch_requests": s.max_batch_requests,
            "max_client_batch_size": s.max_client_batch_size,
            "auto_truncate": s.auto_truncate,
            "tokenization_workers": 1,
            "version": lorakit_version(),
            "sha": None,
            "docker_label": None,
            **self.listing(),
        }


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot key torch's ``ModuleDict``, where each layer keeps its adapters
    (a ``.``, or a name of its own attributes such as ``training``); None when it can."""
    try:
        torch.nn.ModuleDict({name: torch.nn.Identity()})
    except KeyError as e:
        return str(e.args[0])
    return None


def reserved_names() -> list[str]:
    """Every name ``name_problem`` refuses that holds no ``.``: ``ModuleDict``'s attributes."""
    return sorted(n for n in dir(torch.nn.ModuleDict()) if "." not in n and name_problem(n))


def error_response(e: ApiError) -> JSONResponse:
    """TEI's error body with the error's status (and ``Connection: close`` where needed)."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.response_headers())


def _page() -> str:
    return (importlib.resources.files("lorakit") / "static" / "index.html").read_text("utf-8")


async def _json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past ``limit`` bytes, 422 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "validation", f"request body is larger than {limit} bytes", close=True)
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(
                413, "validation", f"request body is larger than {limit} bytes", close=True
            )
    try:
        return json.loads(raw)
    except ValueError as e:  # bad JSON or UTF-8, an integer past Python's 4,300 digits
        raise validation(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise validation("the body is not valid JSON: nested too deeply") from None


# What each error status of a route means; every one is answered with TEI's ``ErrorBody``.
TOO_LARGE = "validation: the body is over --payload_limit bytes"
CLASSIFY_ERRORS = {
    404: "not_found: no adapter of that name is loaded",
    413: "validation: the body is over --payload_limit bytes, the batch over "
    "--max_client_batch_size, or a text over the adapter's max_length tokens (and not truncated)",
    422: "validation: the body does not match the schema, or its texts do not fit the adapter (a "
    "pair for a single-text adapter or the reverse); empty: a blank text",
    424: "backend: the model failed on the batch",
    429: "overloaded: --max_concurrent_requests requests are in flight",
}
LOAD_ERRORS = {
    400: "validation: an adapter of that name is already loaded",
    403: "forbidden: runtime loading is off (no --adapter_dir), or lora_path leads outside it",
    413: TOO_LARGE,
    422: "validation: the body does not match the schema, or lora_path holds no adapter for the "
    "base model",
}
UNLOAD_ERRORS = {
    404: "not_found: no adapter of that name is loaded",
    413: TOO_LARGE,
    422: "validation: the body does not match the schema",
}


def _responses(ok: type[BaseModel], errors: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: the success model, then each error status it can answer."""
    out: dict[int | str, dict[str, Any]] = {200: {"model": ok, "description": "Success"}}
    out.update({code: {"model": ErrorBody, "description": text} for code, text in errors.items()})
    return out


def _body(schema: str, limit: int) -> dict[str, Any]:
    """``openapi_extra`` naming the body schema of a route that reads its own JSON (``_json``)."""
    return {
        "requestBody": {
            "required": True,
            "description": f"JSON, at most {limit} bytes (--payload_limit)",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


def _openapi(app: FastAPI, max_batch: int) -> dict[str, Any]:
    """FastAPI's document plus the request bodies' schemas, which no route parameter names."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        doc.setdefault("components", {}).setdefault("schemas", {}).update(
            request_schemas(max_batch, reserved_names())
        )
        app.openapi_schema = doc
    return app.openapi_schema


def create_app(server: Server) -> FastAPI:
    """The FastAPI app around ``server``; its worker runs between startup and shutdown."""
    from lorakit.adapter import lorakit_version

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        server.batcher.start()
        yield
        await asyncio.to_thread(server.batcher.stop)
        server.tokenizing.shutdown()

    app = FastAPI(
        title="lorakit serve",
        version=lorakit_version(),
        description="Text classification with many LoRA adapters over one base model: TEI's "
        "API, the Hugging Face Inference API, vLLM's adapter loading. Every error is TEI's "
        'body, {"error": ..., "error_type": ...}.',
        lifespan=lifespan,
        docs_url="/docs",
    )
    max_batch = server.settings.max_client_batch_size
    app.openapi = lambda: _openapi(app, max_batch)  # type: ignore[method-assign]

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        """A bug, not the client's fault: still TEI's JSON body, and a fresh connection."""
        error = ApiError(500, "backend", f"internal error: {type(e).__name__}", close=True)
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, e: HTTPException) -> JSONResponse:
        """No such path (404) or method (405): TEI's body too, not Starlette's ``detail``."""
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "validation")
        body = {"error": str(e.detail), "error_type": error_type}
        headers = dict(e.headers or {})
        if e.status_code == 405:  # Starlette names the first route's methods; "/" has two
            headers["Allow"] = _allowed(app, request.url.path)
        return JSONResponse(body, status_code=e.status_code, headers=headers)

    _classify_routes(app, server)
    _adapter_routes(app, server)
    _status_routes(app, server)
    return app


def _allowed(app: FastAPI, path: str) -> str:
    """Every method some route serves at ``path``, for a 405's Allow header."""
    from starlette.routing import Route

    methods = {
        m
        for r in app.routes
        if isinstance(r, Route) and r.methods and r.path_regex.match(path)
        for m in r.methods
    }
    return ", ".join(sorted(methods))


def _classify_routes(app: FastAPI, server: Server) -> None:
    """TEI's /predict and POST /, and the Inference API's /models/{name}, documented with their
    bodies, their success and each error they answer."""
    limit = server.settings.payload_limit

    async def body_of(request: Request) -> Any:
        return await _json(request, limit)

    @app.post(
        "/predict",
        responses=_responses(Predictions, CLASSIFY_ERRORS),
        openapi_extra=_body("PredictBody", limit),
    )
    async def predict(request: Request) -> Response:
        try:
            body = await body_of(request)
        except ApiError as e:
            return error_response(e)
        name = body.get("adapter") if isinstance(body, dict) else None
        return await server.run(
            "predict", name if isinstance(name, str) else None, lambda: server.predict(body)
        )

    @app.post(
        "/models/{name}",
        responses=_responses(InferencePredictions, CLASSIFY_ERRORS),
        openapi_extra=_body("InferenceBody", limit),
    )
    async def hf_inference(name: str, request: Request) -> Response:
        return await inference("models", name, request)

    @app.post(
        "/",
        responses=_responses(InferencePredictions, CLASSIFY_ERRORS),
        openapi_extra=_body("InferenceBody", limit),
    )
    async def root(request: Request) -> Response:
        """TEI's root route: the default adapter, so InferenceClient("http://host:port") works."""
        return await inference("root", None, request)

    async def inference(route: str, name: str | None, request: Request) -> Response:
        """The Inference API's body on adapter ``name`` (None: the default)."""
        try:
            body = await body_of(request)
        except ApiError as e:
            return error_response(e)
        return await server.run(route, name, lambda: server.hf_inference(name, body))


def _adapter_routes(app: FastAPI, server: Server) -> None:
    """vLLM's adapter calls: list, load (inside --adapter_dir only), unload."""
    limit = server.settings.payload_limit

    async def body_of(request: Request) -> Any:
        return await _json(request, limit)

    @app.get("/v1/adapters", response_model=AdapterList)
    async def adapters() -> dict[str, Any]:
        return server.listing()

    @app.post(
        "/v1/load_lora_adapter",
        responses=_responses(AdapterInfo, LOAD_ERRORS),
        openapi_extra=_body("LoadAdapterBody", limit),
    )
    async def load(request: Request) -> Response:
        try:
            return JSONResponse(await server.load(await body_of(request)))
        except ApiError as e:
            return error_response(e)

    @app.post(
        "/v1/unload_lora_adapter",
        responses=_responses(Unloaded, UNLOAD_ERRORS),
        openapi_extra=_body("UnloadAdapterBody", limit),
    )
    async def unload(request: Request) -> Response:
        try:
            return JSONResponse(await server.unload(await body_of(request)))
        except ApiError as e:
            return error_response(e)


def _status_routes(app: FastAPI, server: Server) -> None:
    """TEI's /health, /info and /metrics, and the page at /."""

    @app.get("/health", responses=_responses(Health, {503: "unhealthy: the model worker stopped"}))
    async def health() -> Response:
        if not server.batcher.alive:
            error = ApiError(503, "unhealthy", "the model worker is not running")
            return error_response(error)
        return JSONResponse({"status": "ok"})

    @app.get("/info", response_model=Info)
    async def info() -> dict[str, Any]:
        return server.info()

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus' text exposition format"}},
    )
    async def metrics() -> Response:
        server.metrics.queue.set(server.batcher.queue_size())
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return _page()


def build_server(settings: ServeSettings) -> Server:
    """Load the base model and every ``--adapter``; ``LoraKitError`` on any bad one."""
    if not settings.adapters and not settings.adapter_dir:
        raise LoraKitError("give at least one --adapter NAME=DIR (or --adapter_dir to load later)")
    names = [name for name, _ in settings.adapters]
    for name, directory in settings.adapters:
        if problem := name_problem(name):
            raise LoraKitError(
                f"--adapter {name}={directory}: not a name for an adapter: {problem}"
            )
    if len(set(names)) != len(names):
        raise LoraKitError(f"adapter names must differ: {', '.join(names)}")
    if settings.default_adapter and settings.default_adapter not in names:
        raise LoraKitError(f"--default_adapter {settings.default_adapter!r} is not among {names}")
    if settings.adapter_dir and not Path(settings.adapter_dir).is_dir():
        raise LoraKitError(f"--adapter_dir {settings.adapter_dir} is not a directory")
    from lorakit.hub import resolve_adapter

    resolved = []
    for name, directory in settings.adapters:
        try:
            resolved.append((name, directory, resolve_adapter(directory)))
        except LoraKitError as e:
            raise LoraKitError(f"--adapter {name}={directory}: {e}") from None
    model = settings.model or _base_of(resolved)
    quantize = settings.quantize_base or _quantized_as(resolved)
    adapters = AdapterSet(model, precision=settings.precision, quantize_base=quantize)
    for name, directory, path in resolved:
        try:
            adapters.load(name, path)
        except LoraKitError as e:
            raise LoraKitError(f"--adapter {name}={directory}: {e}") from None
    return Server(settings, adapters)


def _quantized_as(adapters: list[tuple[str, str, Path]]) -> str:
    """The base quantization the first adapter was trained on (lorakit.json), else none."""
    from lorakit.models import read_saved_config

    if not adapters:
        return "none"
    try:
        return str(read_saved_config(adapters[0][2]).get("quantize_base") or "none")
    except LoraKitError:
        return "none"  # _base_of names the unreadable adapter


def _base_of(adapters: list[tuple[str, str, Path]]) -> str:
    """The base model the first adapter names (``minilm`` when there is none)."""
    from lorakit.adapter import read_adapter_config

    if not adapters:
        return "minilm"
    name, directory, path = adapters[0]
    try:
        base = read_adapter_config(path).get("base_model_name_or_path")
    except LoraKitError as e:
        raise LoraKitError(f"--adapter {name}={directory}: {e}") from None
    if not base:
        raise LoraKitError(f"--adapter {name}={directory} names no base model; pass --model")
    return str(base)


class GracefulServer(uvicorn.Server):
    """uvicorn, except that a SIGTERM or Ctrl-C ending a clean shutdown exits with code 0.

    On either signal uvicorn stops accepting, lets requests in flight finish and runs the
    app's shutdown (which drains the batcher); stock uvicorn then re-raises the signal, so
    the process would die of it instead of returning.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, self.handle_exit) for s in signals}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_server(server: Server, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C, then return once everything in flight is answered."""
    config = uvicorn.Config(
        create_app(server),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        # Longer than clients' and load balancers' idle timeouts, so the server never closes
        # a kept-alive connection just as a client sends on it (seen as a ReadError).
        timeout_keep_alive=75,
    )
    GracefulServer(config).run()
