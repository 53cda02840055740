"""``lorakit serve``'s /openapi.json tells the truth: schemathesis, the real CLI, sends a real
server generated requests, valid and invalid by the document, and checks every answer against it
(status codes, content types, response schemas, valid bodies accepted, invalid ones refused)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import serving
from tiny_adapter import make_served_set

from lorakit.protocol import SPACE

# Each setting says why. Dictionaries send real adapter names and adapter directories part of
# the time, so generated requests get past the 404 "no such adapter" to the model and to loading.
CONFIG = """
[dictionaries]
adapters = { values = ["sst2", "mrpc", "grades"] }
library = { values = ["sst2", "mrpc"] }

[[operations]]
include-path = "/predict"
parameters = { "body.adapter" = { dictionary = "adapters", probability = 0.7 } }

[[operations]]
include-path = "/models/{name}"
parameters = { "path.name" = { dictionary = "adapters", probability = 0.7 } }

# A body the schema allows can still not fit the adapter it goes to: a sentence pair for a
# single-text adapter or the reverse (422), a text past the adapter's max_length tokens (413).
# Both depend on which adapters are loaded, which a static document cannot know; the document
# says so in the 413 and 422 responses, whose bodies are checked like every other.
# A batch past --max_client_batch_size breaks the schema's maxItems and is answered 413, TEI's
# status for it, which schemathesis' list of rejections lacks.
[[operations]]
include-path-regex = "^/(predict|models/|$)"
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "413", "422", "429"]
checks.negative_data_rejection.expected-statuses = ["400", "404", "405", "413", "422", "429"]

# A load succeeds only if lora_name is free (400 otherwise) and lora_path holds an adapter for
# this base model (422 otherwise): facts about the server and its disk, not about the body.
[[operations]]
include-path = "/v1/load_lora_adapter"
parameters = { "body.lora_path" = { dictionary = "library", probability = 0.5 } }
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "403", "422"]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base model and adapters of tests/test_serve.py's ``env``."""
    return make_served_set(tmp_path_factory.mktemp("openapi"))


@pytest.fixture(scope="module")
def url(env: dict[str, Path]) -> Iterator[str]:
    args = [
        "--model",
        str(env["base"]),
        "--adapter",
        f"sst2={env['sst2']}",
        "--adapter",
        f"mrpc={env['mrpc']}",
        "--adapter",
        f"grades={env['grades']}",
        "--adapter_dir",
        str(env["library"]),
        "--max_client_batch_size",
        "4",  # small, so generated batches cross it
        "--precision",
        "fp32",
    ]
    with serving(args) as base_url:
        yield base_url


def test_schemathesis_finds_nothing_the_document_does_not_say(url: str, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        *(sys.executable, "-m", "schemathesis.cli"),  # the CLI, `schemathesis`
        "--config-file",
        str(config),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "50",
        "--seed",
        "0",
        "--workers",
        "1",
        "--generation-database",
        "none",  # nothing remembered between runs: the seed alone decides the requests
        "--continue-on-failure",
        "--request-timeout",
        "30",
        "--no-color",
    ]
    no_proxy = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.run(  # in tmp_path: reports and caches, if any, land there
        command, cwd=tmp_path, env=no_proxy, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 100, out
    assert "failure" not in out.strip().splitlines()[-1], out


def test_document_lists_every_status_and_media_type(url: str) -> None:
    doc = httpx.get(f"{url}/openapi.json").json()
    statuses = {
        (method.upper(), path): sorted(op["responses"])
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    assert statuses == {
        ("POST", "/predict"): ["200", "404", "413", "422", "424", "429"],
        ("POST", "/models/{name}"): ["200", "404", "413", "422", "424", "429"],
        ("POST", "/"): ["200", "404", "413", "422", "424", "429"],
        ("GET", "/v1/adapters"): ["200"],
        ("POST", "/v1/load_lora_adapter"): ["200", "400", "403", "413", "422"],
        ("POST", "/v1/unload_lora_adapter"): ["200", "404", "413", "422"],
        ("GET", "/health"): ["200", "503"],
        ("GET", "/info"): ["200"],
        ("GET", "/metrics"): ["200"],
        ("GET", "/"): ["200"],
    }
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for item in doc["paths"].values():
        for op in item.values():
            for status, response in op["responses"].items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"] == error
            if "requestBody" in op:
                assert list(op["requestBody"]["content"]) == ["application/json"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(doc["paths"]["/"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's own 422 body is never sent
    assert schemas["PredictBatch"]["maxItems"] == schemas["InferenceBatch"]["maxItems"] == 4
    assert schemas["LoadAdapterBody"]["properties"]["lora_path"]["maxLength"] == 4096


def test_names_the_document_refuses_are_refused(url: str) -> None:
    """torch keeps each layer's adapters in a ModuleDict: a '.' or one of its attribute names
    cannot be a key. The document says which; loading one is a 422, not a 500."""
    doc = httpx.get(f"{url}/openapi.json").json()
    name = doc["components"]["schemas"]["LoadAdapterBody"]["properties"]["lora_name"]
    assert {"training", "forward", "keys"} <= set(name["not"]["enum"])
    for bad in ("a.b", "training", "forward"):
        body = {"lora_name": bad, "lora_path": "sst2"}
        response = httpx.post(f"{url}/v1/load_lora_adapter", json=body)
        assert response.status_code == 422 and response.json()["error_type"] == "validation"
    assert not {"a.b", "training", "forward"} & {
        a["id"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]
    }


def test_no_route_and_wrong_method_are_tei_errors_too(url: str) -> None:
    for response, status in (
        (httpx.get(f"{url}/nothing"), 404),
        (httpx.get(f"{url}/predict"), 405),
    ):
        assert response.status_code == status
        assert set(response.json()) == {"error", "error_type"}
    assert httpx.get(f"{url}/predict").headers["allow"] == "POST"


def test_blank_pattern_is_what_strip_removes() -> None:
    """The schema's "blank" (SPACE) is exactly the server's: str.strip()'s characters."""
    space = re.compile(f"[{SPACE}]")
    assert all(bool(space.fullmatch(chr(c))) == chr(c).isspace() for c in range(sys.maxunicode + 1))
