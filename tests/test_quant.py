"""QLoRA: the NF4 table, block-wise and double quantization, the quantized LoRA linear, and
an adapter trained on an nf4 base through train, predict, eval, merge and serve."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    FAMILIES,
    interrupt_at,
    make_batch,
    make_model,
    save_tiny_model_dir,
    write_sentiment_rows,
)
from transformers import AutoModelForSequenceClassification

from lorakit.adapter import read_adapter_config
from lorakit.cli import main
from lorakit.errors import LoraKitError
from lorakit.inject import apply_lora_to_model, quantize_base, quantized_kind
from lorakit.models import load_adapted_model
from lorakit.predict import Predictor
from lorakit.quant import (
    BLOCK,
    NF4,
    QuantLinear,
    dequantize_absmax,
    dequantize_nf4,
    quantize_absmax,
    quantize_nf4,
)
from lorakit.state import count_lora_parameters, mark_only_lora_as_trainable, unwrap_lora
from lorakit.wrapper import LinearWithLoRA


def _weight(out: int = 48, inp: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05  # 200 per row: blocks cross rows


def test_the_nf4_table_is_the_papers() -> None:
    assert NF4.shape == (16,) and bool((NF4[1:] > NF4[:-1]).all())
    assert NF4[0] == -1 and NF4[-1] == 1 and NF4[7] == 0  # 7 negative, 8 positive levels
    # Equal-mass bins of N(0, 1) on each side: the positive levels are normal quantiles.
    normal = torch.distributions.Normal(0.0, 1.0)
    top = normal.icdf(torch.tensor(0.5 * ((1 - 1 / 30) + (1 - 1 / 32))))
    second = normal.icdf(torch.tensor(0.5 * ((1 - 1 / 30) + (1 - 1 / 32)) - (0.4677083 / 8)))
    assert float(NF4[-2]) == pytest.approx(float(second / top), abs=1e-5)


def test_nf4_round_trip_stays_within_half_the_tables_spacing() -> None:
    w = _weight()
    codes, absmax = quantize_nf4(w)
    assert codes.dtype == torch.uint8 and codes.numel() == -(-w.numel() // BLOCK) * BLOCK // 2
    back = dequantize_nf4(codes, absmax, tuple(w.shape), torch.float32)
    blocks = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % BLOCK)).view(-1, BLOCK)
    error = torch.nn.functional.pad((back - w).reshape(-1), (0, -w.numel() % BLOCK))
    half_gap = float((NF4[1:] - NF4[:-1]).max()) / 2
    bound = blocks.abs().amax(1) * half_gap + 1e-7
    assert bool((error.view(-1, BLOCK).abs().amax(1) <= bound).all())
    assert float((back - w).abs().max()) > 0  # it is lossy: the test above is not vacuous


def test_double_quantization_recovers_the_absmax_within_fp8_rounding() -> None:
    absmax = _weight(1, 1000).abs().reshape(-1) + 0.02  # 1000 constants: 4 groups, one partial
    state = quantize_absmax(absmax)
    assert state["absmax"].dtype == torch.uint8 and state["absmax"].numel() == 1000
    assert state["absmax2"].numel() == 4
    back = dequantize_absmax(state["absmax"], state["absmax2"], state["absmax_mean"])
    centred = (absmax - absmax.mean()).abs()
    # e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4, plus subnormals near 0.
    assert bool(((back - absmax).abs() <= centred / 16 + 1e-3 * state["absmax2"].max()).all())


def test_codes_and_dequantized_weights_match_bitsandbytes() -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    w = _weight()
    theirs, stats = functional.quantize_4bit(
        w, blocksize=BLOCK, quant_type="nf4", compress_statistics=False
    )
    torch.testing.assert_close(NF4, functional.get_4bit_type("nf4", device="cpu"))
    codes, absmax = quantize_nf4(w)
    assert torch.equal(codes, theirs.reshape(-1))
    assert torch.equal(absmax, stats.absmax)
    torch.testing.assert_close(
        dequantize_nf4(codes, absmax, tuple(w.shape), torch.float32),
        functional.dequantize_4bit(theirs, stats),
        atol=1e-7,
        rtol=0,
    )


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_lora_linear_matches_a_dequantized_fp32_reference(kind: str) -> None:
    base = torch.nn.Linear(200, 48)
    with torch.no_grad():
        base.weight.copy_(_weight())
    quantized = QuantLinear.from_linear(base, kind)  # type: ignore[arg-type]
    reference = quantized.to_linear()
    ours, ref = LinearWithLoRA(quantized, 4, 8.0), LinearWithLoRA(reference, 4, 8.0)
    with torch.no_grad():
        ours.lora.lora_B.normal_()
    ref.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(3, 5, 200)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for name in ("lora_A", "lora_B"):
        got, want = getattr(ours.lora, name).grad, getattr(ref.lora, name).grad
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert not [p for p in quantized.parameters() if p.requires_grad]


def test_the_quantized_matmul_saves_no_full_precision_weight_for_backward() -> None:
    quantized = QuantLinear(_weight(256, 256), None, "nf4")

    def saved_shapes(layer: LinearWithLoRA) -> list[torch.Size]:
        saved: list[torch.Size] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.shape)
            return t

        x = torch.randn(2, 256, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
        return saved

    assert torch.Size([256, 256]) in saved_shapes(LinearWithLoRA(quantized.to_linear(), 4, 8.0))
    saved = saved_shapes(LinearWithLoRA(quantized, 4, 8.0))
    assert saved and torch.Size([256, 256]) not in saved


def test_bf16_autocast_runs_the_quantized_layer_close_to_fp32() -> None:
    layer = LinearWithLoRA(QuantLinear(_weight(), None, "nf4"), 4, 8.0)
    x = torch.randn(4, 200, requires_grad=True)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    got.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_quantize_base_spares_embeddings_layernorms_and_the_head(family: str) -> None:
    model = make_model(family)
    apply_lora_to_model(model, FAMILIES[family][1], rank=4, alpha=8)
    mark_only_lora_as_trainable(model)
    batch = make_batch()
    with torch.no_grad():
        before = model(**batch).logits
    stats = quantize_base(model, "nf4")
    assert quantized_kind(model) == "nf4"
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Embedding", "LayerNorm"} <= kinds
    head = model.classifier if family == "bert" else model.score
    assert isinstance(head, torch.nn.Linear)
    wrapped = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert wrapped and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    assert stats["bytes_after"] <= 0.3 * stats["params"] * 2  # <= 0.3x their bf16 bytes
    counted = count_lora_parameters(model)
    assert counted["quantized_params"] == stats["params"]
    assert counted["total"] == sum(p.numel() for p in make_model(family).parameters()) + sum(
        p.numel() for n, p in model.named_parameters() if ".adapters." in n
    )
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, atol=0.1, rtol=0.1)  # lossy, but near


def test_merging_a_quantized_base_means_dequantize_and_add() -> None:
    model = make_model("bert")
    apply_lora_to_model(model, FAMILIES["bert"][1], rank=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    quantize_base(model, "nf4")
    layer = next(m for m in model.modules() if isinstance(m, LinearWithLoRA))
    with pytest.raises(LoraKitError, match="quantized base"):
        layer.merge_weights()
    batch = make_batch()
    with torch.no_grad():
        want = model(**batch).logits
        unwrap_lora(model)
        got = model(**batch).logits
    assert not any(isinstance(m, (QuantLinear, LinearWithLoRA)) for m in model.modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward in one training forward (activations, weights)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    return total


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("kind", [None, "nf4"])
def test_a_bf16_base_runs_frozen_weights_in_bf16_and_trains_fp32_tensors(
    family: str, kind: str | None
) -> None:
    from lorakit.state import store_frozen_as

    reference = make_model(family)
    apply_lora_to_model(reference, "all-linear", 4, 8)
    mark_only_lora_as_trainable(reference)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    if kind:
        quantize_base(reference, kind)
    model = copy.deepcopy(reference)
    assert store_frozen_as(model, torch.bfloat16) > 0
    for name, p in model.named_parameters():
        want = torch.float32 if p.requires_grad else torch.bfloat16
        assert p.dtype == want, name  # the head and LoRA fp32, every frozen tensor bf16
    batch = make_batch()
    out = model(**batch, output_hidden_states=True)
    assert out.hidden_states[-1].dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    with torch.no_grad():
        want_logits = reference(**batch).logits
    torch.testing.assert_close(out.logits, want_logits, atol=2e-2, rtol=2e-2)
    # What the mode is for: autograd keeps about half of fp32's bytes for backward.
    assert _saved_bytes(model, batch) < 0.6 * _saved_bytes(reference, batch)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA run on an nf4 base, end to end through the CLI."""
    root = tmp_path_factory.mktemp("qlora")
    data = root / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 48, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 16, seed=1)
    model = save_tiny_model_dir(root / "model")
    out = root / "run"
    args = ["train", "--model", str(model), "--data_dir", str(data), "--output_dir", str(out)]
    flags = ["--quantize_base", "nf4", "--rank", "4", "--alpha", "8", "--learning_rate", "1e-2"]
    rest = ["--batch_size", "8", "--num_epochs", "3", "--precision", "fp32", "--max_length", "32"]
    assert main([*args, *flags, *rest]) == 0
    return {"run": out, "model": model, "data": data}


def test_training_on_an_nf4_base_learns_and_writes_an_ordinary_lora_adapter(
    trained: dict[str, Path], peft
) -> None:
    out = trained["run"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantize_base"] == "nf4" and summary["best_eval_accuracy"] > 0.75
    assert summary["quantized_base_bytes"] > 0
    log = (out / "training_log.txt").read_text()
    assert "nf4 base" in log and "Quantized base:" in log
    config = read_adapter_config(out / "best")
    assert config["peft_type"] == "LORA" and config["quantize_base"] == "nf4"
    # PEFT reads it as any LoRA adapter (on a full-precision base: the quantization is ours).
    base = AutoModelForSequenceClassification.from_pretrained(trained["model"])
    peft.PeftModel.from_pretrained(base, out / "best")


def test_an_nf4_adapter_loads_quantized_and_predict_eval_and_serve_agree(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from fastapi.testclient import TestClient

    from lorakit.serve import ServeSettings, build_server, create_app

    best = trained["run"] / "best"
    model, _, config = load_adapted_model(best)
    assert config["quantize_base"] == "nf4" and quantized_kind(model) == "nf4"
    texts = ["good movie", "awful plot", "great fun was the movie"]
    predictor = Predictor.from_adapter(best, precision="fp32")
    assert "unmerged" in predictor.description and "nf4 base" in predictor.description
    want = predictor.predict(texts)
    full = Predictor.from_adapter(best, precision="fp32", quantize_base="none").predict(texts)
    assert [p["label"] for p in full] == [p["label"] for p in want]
    assert main(["eval", "--adapter", str(best), "--data_dir", str(trained["data"]), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["quantize_base"] == "nf4"
    assert metrics["accuracy"] == pytest.approx(config["metrics"]["accuracy"])
    server = build_server(ServeSettings(adapters=[("sst2", str(best))], precision="fp32"))
    with TestClient(create_app(server)) as client:
        assert client.get("/info").json()["quantize_base"] == "nf4"
        got = client.post("/predict", json={"inputs": [[t] for t in texts]}).json()
    for mine, theirs in zip(want, got, strict=True):
        scores = {o["label"]: o["score"] for o in theirs}
        assert scores == pytest.approx(mine["probs"], abs=1e-5)


def test_merge_of_an_nf4_adapter_writes_the_dequantized_model(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    best = trained["run"] / "best"
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(best), "--out", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    quantized, tokenizer, _ = load_adapted_model(best)
    inputs = tokenizer(["good movie", "awful plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            plain(**inputs).logits, quantized(**inputs).logits, atol=1e-5, rtol=1e-5
        )


def test_training_on_a_bf16_nf4_base_learns_and_saves_fp32_adapter_tensors(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    args = ["train", "--model", str(trained["model"]), "--data_dir", str(trained["data"])]
    out = tmp_path / "run"
    flags = ["--quantize_base", "nf4", "--base_dtype", "bf16", "--rank", "4", "--alpha", "8"]
    rest = ["--learning_rate", "1e-2", "--batch_size", "8", "--num_epochs", "3", "--max_length"]
    assert main([*args, "--output_dir", str(out), *flags, *rest, "32", "--precision", "fp32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_dtype"] == "bf16" and summary["quantize_base"] == "nf4"
    assert summary["best_eval_accuracy"] > 0.75
    assert "nf4 bf16 base" in (out / "training_log.txt").read_text()
    tensors = load_file(out / "best" / "adapter_model.safetensors")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    # It predicts on the full-precision base like any adapter.
    assert Predictor.from_adapter(out / "best", precision="fp32").predict(["good movie"])
    # Full fine-tuning trains the base: a bf16 store of it is refused before anything is written.
    full = tmp_path / "full"
    refused = ["--output_dir", str(full), "--method", "full", "--base_dtype", "bf16"]
    assert main([*args, *refused]) != 0
    err = capsys.readouterr().err.strip()
    assert "method full" in err and len(err.splitlines()) == 1 and not full.exists()


def test_quantizing_a_fully_trained_model_or_an_unknown_kind_is_refused(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--model", str(trained["model"]), "--data_dir", str(trained["data"])]
    out = tmp_path / "full"
    refused = ["--output_dir", str(out), "--method", "full", "--quantize_base", "nf4"]
    assert main([*args, *refused]) != 0
    err = capsys.readouterr().err.strip()
    assert "method full" in err and len(err.splitlines()) == 1 and not out.exists()
    with pytest.raises(LoraKitError, match="not one of nf4, int8"):
        quantize_base(make_model("bert"), "nf2")


def test_a_peft_lora_adapter_runs_on_an_nf4_base_as_peft_on_the_dequantized_weights(
    trained: dict[str, Path], tmp_path: Path, peft
) -> None:
    model_dir = trained["model"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    config.modules_to_save = ["classifier"]
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    theirs = peft.get_peft_model(base, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    ours, tokenizer, _ = load_adapted_model(tmp_path / "peft", str(model_dir), quantize_base="nf4")
    # PEFT's model on the weights our nf4 base holds: what a QLoRA adapter means.
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LinearWithLoRA):
                target = theirs.base_model.model.get_submodule(name).base_layer
                target.weight.copy_(module.weight())
            elif isinstance(module, QuantLinear):
                theirs.base_model.model.get_submodule(name).weight.copy_(module.weight)
    inputs = tokenizer(["good movie", "awful plot was dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**inputs).logits, theirs.eval()(**inputs).logits, atol=1e-5, rtol=1e-5
        )


def test_ctrl_c_then_resume_on_an_nf4_base_reproduces_the_run(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    def args(out: Path) -> list[str]:
        return [
            *["train", "--model", str(trained["model"]), "--data_dir", str(trained["data"])],
            *["--output_dir", str(out), "--quantize_base", "nf4", "--rank", "4"],
            *["--batch_size", "8", "--num_epochs", "2", "--precision", "fp32"],
            *["--max_length", "32"],
        ]

    full, split = tmp_path / "full", tmp_path / "split"
    assert main(args(full)) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 8)  # mid epoch 2 (6 steps an epoch)
        assert main(args(split)) == 130
    assert main(["train", "--resume", "--output_dir", str(split)]) == 0
    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(split / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
