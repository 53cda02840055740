"""``lorakit serve`` as clients see it: TEI's HTTP API, huggingface_hub's InferenceClient,
runtime adapter loading, every limit, and a clean SIGTERM. A real server on a loopback port."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_helpers import free_port, server_command, serving
from tiny_adapter import make_served_set

from lorakit.predict import Predictor

TEXTS = ["the movie was good", "not a great film", "fine", "bad bad bad movie, not fine at all"]
PAIRS = [["the film was fine", "the movie was good"], ["not good", "great"]]
PAYLOAD_LIMIT = 6000  # bytes, the test server's --payload_limit


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_served_set(tmp_path_factory.mktemp("serve"))


def _args(env: dict[str, Path], *extra: str) -> list[str]:
    return [
        "--model",
        str(env["base"]),
        "--adapter",
        f"sst2={env['sst2']}",
        "--adapter",
        f"mrpc={env['mrpc']}",
        "--adapter",
        f"grades={env['grades']}",
        "--precision",
        "fp32",  # compared with fp32 predictions at fp32 tolerances (test_precision: bf16)
        *extra,
    ]


@pytest.fixture(scope="module")
def url(env: dict[str, Path]) -> Iterator[str]:
    extra = ["--adapter_dir", str(env["library"]), "--max_client_batch_size", "4"]
    with serving(_args(env, *extra, "--payload_limit", str(PAYLOAD_LIMIT))) as base_url:
        yield base_url


def _alone(directory: Path, texts: list) -> list[dict[str, float]]:  # noqa: ANN001
    """What ``lorakit predict`` gives with this adapter alone (unmerged, as the server runs)."""
    predictor = Predictor.from_adapter(directory, merge=False, precision="fp32")
    return [
        p["probs"]
        for p in predictor.predict([t if isinstance(t, str) else tuple(t) for t in texts])
    ]


def _as_probs(answer: list[dict]) -> dict[str, float]:
    return {item["label"]: item["score"] for item in answer}


def test_tei_single_pair_and_batch(url: str, env: dict[str, Path]) -> None:
    one = httpx.post(f"{url}/predict", json={"inputs": TEXTS[0]}).json()  # the default: sst2
    assert [x["label"] for x in one] == sorted(
        _alone(env["sst2"], [TEXTS[0]])[0], key=lambda k: -_alone(env["sst2"], [TEXTS[0]])[0][k]
    )
    assert one[0]["score"] >= one[1]["score"] and sum(x["score"] for x in one) == pytest.approx(1)
    pair = httpx.post(f"{url}/predict", json={"inputs": PAIRS[0], "adapter": "mrpc"}).json()
    assert _as_probs(pair) == pytest.approx(_alone(env["mrpc"], [PAIRS[0]])[0], abs=1e-5)
    batch = httpx.post(
        f"{url}/predict", json={"inputs": [[t] for t in TEXTS], "adapter": "grades"}
    ).json()
    want = _alone(env["grades"], TEXTS)
    assert len(batch) == len(TEXTS)
    for got, expected in zip(batch, want, strict=True):
        assert [x["label"] for x in got][0] == max(expected, key=expected.get)
        assert _as_probs(got) == pytest.approx(expected, abs=1e-5)
    raw = httpx.post(f"{url}/predict", json={"inputs": TEXTS[1], "raw_scores": True}).json()
    assert sum(x["score"] for x in raw) != pytest.approx(1, abs=1e-3)  # logits, not probabilities


def test_concurrent_requests_of_mixed_adapters_match_each_adapter_alone(
    url: str, env: dict[str, Path]
) -> None:
    jobs = (
        [("sst2", t) for t in TEXTS] + [("mrpc", p) for p in PAIRS] + [("grades", t) for t in TEXTS]
    )
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(
            pool.map(
                lambda job: httpx.post(
                    f"{url}/predict", json={"inputs": job[1], "adapter": job[0]}, timeout=30
                ).json(),
                jobs,
            )
        )
    for (name, text), answer in zip(jobs, answers, strict=True):
        assert _as_probs(answer) == pytest.approx(_alone(env[name], [text])[0], abs=1e-5), name


def test_inference_client_per_adapter_url(
    url: str, env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # HF_HUB_OFFLINE=1 (as offline users set it) makes huggingface_hub refuse every HTTP call,
    # even to 127.0.0.1; a client of a local server must turn it off for itself (README).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    out = InferenceClient(model=f"{url}/models/sst2").text_classification(TEXTS[3])
    want = _alone(env["sst2"], [TEXTS[3]])[0]
    assert {o.label: o.score for o in out} == pytest.approx(want, abs=1e-5)
    # The server's own URL, as for TEI: the default adapter (sst2, the first --adapter).
    root = InferenceClient(model=url).text_classification(TEXTS[3])
    assert {o.label: o.score for o in root} == pytest.approx(want, abs=1e-5)
    top = InferenceClient(model=f"{url}/models/grades").text_classification(TEXTS[0], top_k=1)
    grades = _alone(env["grades"], [TEXTS[0]])[0]
    assert [o.label for o in top] == [max(grades, key=grades.get)]
    raw = InferenceClient(model=f"{url}/models/grades").text_classification(
        TEXTS[0], function_to_apply="sigmoid"
    )
    assert all(0 < o.score < 1 for o in raw) and sum(o.score for o in raw) != pytest.approx(1)


def _error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    return body["error"]


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        (b"{oops", 422, "validation"),
        (b'{"text": "no inputs key"}', 422, "validation"),
        (b'{"inputs": 42}', 422, "validation"),
        (b'{"inputs": ""}', 422, "empty"),
        (b'{"inputs": ["a", "b", "c"]}', 422, "validation"),
        (b'{"inputs": [["a"], ["b"], ["c"], ["d"], ["e"]]}', 413, "validation"),
        (b'{"inputs": ["a pair", "for sst2"]}', 422, "validation"),
        (b'{"inputs": "x", "raw_scores": "yes"}', 422, "validation"),
        (json.dumps({"inputs": "good " * 1300}).encode(), 413, "validation"),  # > payload_limit
        (json.dumps({"inputs": "good " * 200}).encode(), 413, "validation"),  # > 32 tokens
        (b"[" * 100_000 + b"]" * 100_000, 413, "validation"),  # past the payload limit
        (b"[" * 1_900 + b"]" * 1_900, 422, "validation"),  # under it, nested past the parser
        (b'{"inputs": "x", "raw_scores": ' + b"9" * 5000 + b"}", 422, "validation"),  # > 4300
        (b'{"inputs": "x", "raw_scores": ' + b"9" * 3000 + b"}", 422, "validation"),
        (b'{"inputs": "\\ud800"}', 422, "validation"),  # a lone surrogate
        (b'{"inputs": ["fine", "\\udfff x"]}', 422, "validation"),
        (b'{"inputs": "x", "adapter": "\\ud800"}', 404, "not_found"),
    ],
)
def test_bad_requests_are_json_errors(url: str, body: bytes, status: int, error_type: str) -> None:
    headers = {"Content-Type": "application/json"}
    with httpx.Client() as client:  # one kept-alive connection, as real clients hold one
        response = client.post(f"{url}/predict", content=body, headers=headers)
        _error(response, status, error_type)
        unread = len(body) > PAYLOAD_LIMIT  # the server stopped reading the body
        assert (response.headers.get("connection") == "close") == unread
        assert client.post(f"{url}/predict", json={"inputs": "fine"}).status_code == 200
    if b"ud800" in body and b"adapter" not in body:
        answer = httpx.post(f"{url}/models/sst2", content=body, headers=headers)
        _error(answer, 422, "validation")


def test_malformed_adapters_and_paths_are_422_and_attach_nothing(
    url: str, env: dict[str, Path]
) -> None:
    import shutil

    load = f"{url}/v1/load_lora_adapter"
    before = httpx.get(f"{url}/v1/adapters").json()
    for name, file, key, value in (
        ("bad_r", "adapter_config.json", "r", "eight"),
        ("bad_len", "lorakit.json", "max_length", "abc"),
    ):
        folder = env["library"] / name
        shutil.copytree(env["sst2"], folder)
        config = json.loads((folder / file).read_text())
        config[key] = value
        (folder / file).write_text(json.dumps(config))
        message = _error(
            httpx.post(load, json={"lora_name": name, "lora_path": name}), 422, "validation"
        )
        assert f"{key} must be" in message
    for path in ("sst2\x00", "a" * 5000, "b/" * 2000):
        _error(httpx.post(load, json={"lora_name": "p", "lora_path": path}), 422, "validation")
    assert httpx.get(f"{url}/v1/adapters").json() == before
    answer = httpx.post(f"{url}/predict", json={"inputs": TEXTS[0], "adapter": "sst2"}).json()
    assert _as_probs(answer) == pytest.approx(_alone(env["sst2"], [TEXTS[0]])[0], abs=1e-5)


def test_truncate_cuts_instead_of_refusing(url: str) -> None:
    long = "good " * 200
    right = httpx.post(f"{url}/predict", json={"inputs": long, "truncate": True})
    left = httpx.post(
        f"{url}/predict",
        json={"inputs": "bad " + long, "truncate": True, "truncation_direction": "left"},
    )
    assert right.status_code == left.status_code == 200


def test_unknown_adapter_is_404_naming_the_loaded_ones(url: str) -> None:
    message = _error(
        httpx.post(f"{url}/predict", json={"inputs": "x", "adapter": "nope"}), 404, "not_found"
    )
    assert all(name in message for name in ("sst2", "mrpc", "grades"))
    _error(httpx.post(f"{url}/models/nope", json={"inputs": "x"}), 404, "not_found")


def test_runtime_load_unload_and_path_escapes(url: str, env: dict[str, Path]) -> None:
    load, unload = f"{url}/v1/load_lora_adapter", f"{url}/v1/unload_lora_adapter"
    assert httpx.post(load, json={"lora_name": "again", "lora_path": "sst2"}).status_code == 200
    listed = {a["id"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]}
    assert {"sst2", "mrpc", "grades", "again"} <= listed
    answer = httpx.post(f"{url}/predict", json={"inputs": TEXTS[0], "adapter": "again"}).json()
    assert _as_probs(answer) == pytest.approx(_alone(env["sst2"], [TEXTS[0]])[0], abs=1e-5)
    _error(httpx.post(load, json={"lora_name": "again", "lora_path": "sst2"}), 400, "validation")
    (env["library"] / "escape").symlink_to(env["grades"])  # a link out of --adapter_dir
    for path in ("../grades", str(env["grades"]), "escape", "sst2/../../grades"):
        _error(httpx.post(load, json={"lora_name": "x", "lora_path": path}), 403, "forbidden")
    _error(httpx.post(load, json={"lora_name": "x", "lora_path": "missing"}), 422, "validation")
    _error(httpx.post(load, json={"lora_name": "x"}), 422, "validation")
    assert httpx.post(unload, json={"lora_name": "again"}).status_code == 200
    _error(httpx.post(f"{url}/predict", json={"inputs": "x", "adapter": "again"}), 404, "not_found")
    _error(httpx.post(unload, json={"lora_name": "again"}), 404, "not_found")


def test_unload_lets_requests_in_flight_finish(url: str, env: dict[str, Path]) -> None:
    load, unload = f"{url}/v1/load_lora_adapter", f"{url}/v1/unload_lora_adapter"
    assert httpx.post(load, json={"lora_name": "busy", "lora_path": "mrpc"}).status_code == 200
    body = {"inputs": [PAIRS[i % 2] for i in range(4)], "adapter": "busy"}
    with ThreadPoolExecutor(17) as pool:
        requests = [
            pool.submit(httpx.post, f"{url}/predict", json=body, timeout=30) for _ in range(16)
        ]
        time.sleep(0.05)
        gone = pool.submit(httpx.post, unload, json={"lora_name": "busy"}, timeout=30)
        codes = [r.result().status_code for r in requests]
        assert gone.result().status_code == 200
    # Each request either finished with the adapter or came after it was gone: never a 5xx.
    assert set(codes) <= {200, 404} and 200 in codes


def test_runtime_loading_is_off_without_adapter_dir(env: dict[str, Path]) -> None:
    with serving(_args(env, "--max_concurrent_requests", "1")) as base:
        _error(
            httpx.post(
                f"{base}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "sst2"}
            ),
            403,
            "forbidden",
        )
        body = {"inputs": [[t] for t in TEXTS * 8], "adapter": "grades"}
        with ThreadPoolExecutor(24) as pool:
            codes = list(
                pool.map(
                    lambda _: httpx.post(f"{base}/predict", json=body, timeout=60).status_code,
                    range(24),
                )
            )
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert httpx.get(f"{base}/health").status_code == 200


def test_health_info_and_metrics(url: str) -> None:
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{url}/info").json()
    assert info["max_batch_tokens"] == 16384 and info["max_client_batch_size"] == 4
    assert info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "positive"}
    assert {a["id"] for a in info["data"]} >= {"sst2", "mrpc", "grades"} and info[
        "default"
    ] == "sst2"
    httpx.post(f"{url}/predict", json={"inputs": "fine", "adapter": "grades"})
    text = httpx.get(f"{url}/metrics").text
    assert 'lorakit_request_count_total{adapter="grades",route="predict"}' in text
    assert "lorakit_batch_size_bucket" in text and "lorakit_queue_size" in text
    assert 'lorakit_request_failure_total{adapter="unknown",error_type="not_found"}' in text


def _slow_base(root: Path) -> tuple[Path, Path]:
    """A base wide and deep enough that a full batch takes a good fraction of a second."""
    from tiny_adapter import make_tokenizer
    from transformers import AutoModelForSequenceClassification, BertConfig

    from lorakit import apply_lora_to_model, mark_only_lora_as_trainable, save_adapter

    config = BertConfig(
        vocab_size=100,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=64,
    )
    base = root / "slow_base"
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(base)
    make_tokenizer(base).save_pretrained(base)
    apply_lora_to_model(model, ["query", "value"], rank=4, alpha=8)
    mark_only_lora_as_trainable(model)
    adapter = save_adapter(
        model,
        root / "slow",
        base_model_name_or_path=str(base),
        task="sst2",
        extra={"max_length": 64},
    )
    return base, adapter


def test_sigterm_finishes_in_flight_requests_and_exits_0(env: dict[str, Path]) -> None:
    base, adapter = _slow_base(env["root"])
    port = free_port()
    args = ["--model", str(base), "--adapter", f"slow={adapter}", "--precision", "fp32"]
    proc = subprocess.Popen(
        server_command(args, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"inputs": [["good " * 80]] * 32, "truncate": True}
        answer: list[httpx.Response] = []
        client = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{url}/predict", json=body, timeout=60))
        )
        client.start()
        while "lorakit_requests_in_flight 1.0" not in httpx.get(f"{url}/metrics").text:
            assert client.is_alive(), "the request finished before SIGTERM could be sent"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        client.join(60)
        assert proc.wait(60) == 0
        assert answer and answer[0].status_code == 200 and len(answer[0].json()) == 32
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "lorakit serve" in output and "curl" in output  # the startup banner
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_startup_flags_are_one_line_errors(env: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (["--model", str(env["base"])], "at least one --adapter"),
        (_args(env, "--default_adapter", "nope"), "--default_adapter"),
        (["--model", str(env["base"]), "--adapter", f"x={tmp_path}"], "adapter_config.json"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            server_command(args, free_port()), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1 and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
