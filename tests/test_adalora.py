"""AdaLoRA adapters: PEFT's trained-and-masked adapters load with PEFT's logits, lorakit writes
them back in PEFT's format, and they merge, serve and convert to plain LoRA exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import interrupt_at, make_batch, make_model
from safetensors.torch import load_file

from lorakit import LoraKitError, load_adapter, save_adapter
from lorakit.adalora import AdaLoRALayer
from lorakit.adapter_config import pattern_value
from lorakit.cli import main
from lorakit.inject import lora_layers
from lorakit.state import unwrap_lora

TARGETS = ["query", "value", "dense"]
INIT_R = 6


def _peft_adalora(peft, seed: int = 0):  # noqa: ANN001, ANN202
    """PEFT's AdaLoRA on tiny BERT, as after training: every triplet moved off its init, then
    budget masks that keep 0..INIT_R triplets per layer (masked singular values are zero)."""
    config = peft.AdaLoraConfig(
        task_type="SEQ_CLS",
        init_r=INIT_R,
        target_r=3,
        lora_alpha=12,
        target_modules=TARGETS,
        total_step=100,
        tinit=10,
        tfinal=20,
    )
    model = peft.get_peft_model(make_model("bert"), config)
    g = torch.Generator().manual_seed(seed)
    pattern = {}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for i, (name, p) in enumerate(n for n in model.named_parameters() if "lora_E" in n[0]):
            keep = torch.arange(INIT_R) < (i % (INIT_R + 1))  # 0, 1, ..., INIT_R kept
            keep = keep[torch.randperm(INIT_R, generator=g)]
            p[~keep] = 0
            key = name.removeprefix("base_model.model.").replace(".default", "")
            pattern[key] = keep.tolist()
    model.peft_config["default"].rank_pattern = pattern
    return model.eval(), pattern


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_batch()).logits


@pytest.fixture
def saved(tmp_path: Path, peft) -> tuple[Path, torch.Tensor, dict]:  # noqa: ANN001
    theirs, pattern = _peft_adalora(peft)
    theirs.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", _logits(theirs), pattern


def test_a_peft_adalora_adapter_loads_with_peft_logits(saved) -> None:  # noqa: ANN001
    path, want, pattern = saved
    state = load_file(str(path / "adapter_model.safetensors"))
    assert any(v.shape[0] == 0 for k, v in state.items() if k.endswith("lora_A"))  # rank 0 too
    model = make_model("bert")
    config = load_adapter(model, path)
    assert config["peft_type"] == "ADALORA"
    layers = dict(lora_layers(model))
    assert len(layers) == len(pattern)
    for name, layer in layers.items():
        adapter = layer.lora
        assert isinstance(adapter, AdaLoRALayer)
        assert adapter.rank == sum(pattern[f"{name}.lora_E"]) and adapter.init_r == INIT_R
    torch.testing.assert_close(_logits(model.eval()), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, _logits(make_model("bert")), atol=1e-3)  # it changes them


def test_lorakit_writes_adalora_that_peft_loads_with_the_same_logits(
    saved, tmp_path: Path, peft
) -> None:  # noqa: ANN001
    path, want, pattern = saved
    model = make_model("bert")
    load_adapter(model, path)
    save_adapter(model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and written["init_r"] == INIT_R
    assert written["rank_pattern"] == pattern and written["total_step"] == 100
    theirs = peft.PeftModel.from_pretrained(make_model("bert"), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs), want, atol=1e-5, rtol=1e-5)


def test_merge_and_plain_lora_conversion_keep_the_logits(saved, tmp_path: Path, peft) -> None:  # noqa: ANN001
    path, want, pattern = saved
    model = make_model("bert")
    load_adapter(model, path)
    unwrap_lora(model)
    torch.testing.assert_close(_logits(model.eval()), want, atol=1e-5, rtol=1e-5)

    out = tmp_path / "plain"
    assert main(["merge", "--adapter", str(path), "--out", str(out), "--plain_lora"]) == 0
    plain = json.loads((out / "adapter_config.json").read_text())
    ranks = {n.removesuffix(".lora_E"): sum(m) for n, m in pattern.items() if sum(m)}
    assert plain["peft_type"] == "LORA" and set(plain["target_modules"]) == set(ranks)
    for name, rank in ranks.items():
        assert pattern_value(plain["rank_pattern"], name, plain["r"]) == rank
    theirs = peft.PeftModel.from_pretrained(make_model("bert"), out).eval()
    torch.testing.assert_close(_logits(theirs), want, atol=1e-5, rtol=1e-5)
    ours = make_model("bert")
    load_adapter(ours, out)
    torch.testing.assert_close(_logits(ours.eval()), want, atol=1e-5, rtol=1e-5)


def test_adalora_configs_lorakit_cannot_read_are_one_line_errors(saved) -> None:  # noqa: ANN001
    path, _, pattern = saved
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    key = next(iter(pattern))
    for change, message in (
        ({"init_r": 0}, "init_r must be a positive whole number"),
        ({"rank_pattern": {key: [True]}}, "rank_pattern must map"),
        ({"init_r": None}, "lacks the required key 'init_r'"),
    ):
        config_path.write_text(json.dumps({**config, **change}))
        model = make_model("bert")
        with pytest.raises(LoraKitError, match=message) as err:
            load_adapter(model, path)
        assert "\n" not in str(err.value) and not list(lora_layers(model))


def test_an_adalora_adapter_shares_a_served_batch_with_plain_lora(tmp_path: Path, peft) -> None:  # noqa: ANN001
    import numpy as np
    from tiny_adapter import make_adapter, make_base

    from lorakit.data import collate, encode_texts
    from lorakit.multi import AdapterSet
    from lorakit.predict import Predictor

    base = make_base(tmp_path / "base")
    theirs, _ = _peft_adalora(peft)
    theirs.save_pretrained(tmp_path / "ada")
    config_path = tmp_path / "ada" / "adapter_config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(base)})
    )
    dirs = {"ada": tmp_path / "ada", "plain": make_adapter(tmp_path / "plain", base)}
    adapters = AdapterSet(str(base))
    for name, directory in dirs.items():
        adapters.load(name, directory)
    assert adapters.adapters["ada"].variant == "AdaLoRA"
    texts = ["the movie was good", "bad film", "fine", "not great at all"]
    names = ["ada", "plain", "plain", "ada"]
    data = encode_texts([(t,) for t in texts], adapters.tokenizer, 32)
    batch = {k: v.numpy() for k, v in collate(data, np.arange(len(texts))).items()}
    del batch["labels"]
    mixed = adapters.logits(batch, names)
    for i, name in enumerate(names):
        alone = Predictor.from_adapter(dirs[name], merge=False, precision="fp32", max_length=32)
        probs = alone.predict([texts[i]])[0]["probs"]
        got = torch.softmax(torch.from_numpy(mixed[i]), -1).tolist()
        assert got == pytest.approx(list(probs.values()), abs=1e-5)


def _budget_settings(**change):  # noqa: ANN003, ANN202
    from lorakit.config import LoraSettings

    settings = dict(rank=INIT_R, alpha=12.0, variant="adalora", target_r=2, tinit=2, tfinal=3)
    settings.update(change)
    return LoraSettings(**settings)


def test_one_budget_step_masks_the_triplets_peft_masks(tmp_path: Path, peft) -> None:  # noqa: ANN001
    from lorakit.budget import RankBudget

    config = peft.AdaLoraConfig(
        task_type="SEQ_CLS",
        init_r=INIT_R,
        target_r=2,
        lora_alpha=12,
        target_modules=TARGETS,
        total_step=20,
        tinit=2,
        tfinal=3,
        deltaT=2,
    )
    theirs = peft.get_peft_model(make_model("bert"), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "start")
    ours = make_model("bert")
    load_adapter(ours, tmp_path / "start")
    budget = RankBudget(ours, _budget_settings(deltaT=2), total_step=20)
    models = (theirs.eval(), ours.eval())  # no dropout: the same gradients on both sides
    for step in range(1, 9):  # warm-up (1, 2), then the budget falls; masks at even steps
        batch = make_batch(seed=step)
        for model in models:
            model.zero_grad()
            model(**batch).logits.square().sum().backward()
        theirs.base_model.update_and_allocate(step)
        budget.step(ours, step)
        pattern = theirs.peft_config["default"].rank_pattern or {}
        masks = {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}
        if step >= 4:
            assert masks, step
            assert {n: a.mask for n, a in budget.layers} == masks, step
    for name, adapter in budget.layers:
        e = theirs.base_model.model.get_submodule(name).lora_E["default"]
        torch.testing.assert_close(adapter.lora_E, e, atol=1e-6, rtol=1e-5)
    assert sum(budget.ranks()) < budget.init_bgt


def test_the_orthogonality_term_is_pefts(tmp_path: Path, peft) -> None:  # noqa: ANN001
    from lorakit.budget import RankBudget

    theirs, _ = _peft_adalora(peft)
    theirs.peft_config["default"].rank_pattern = None
    theirs.save_pretrained(tmp_path / "full")
    ours = make_model("bert")
    load_adapter(ours, tmp_path / "full")
    budget = RankBudget(ours, _budget_settings(), total_step=100)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = theirs.eval()(**make_batch(), labels=labels)
        task = torch.nn.functional.cross_entropy(out.logits, labels)
        torch.testing.assert_close(budget.orth_loss(ours, None), out.loss - task)


def _train_args(env: dict[str, Path], out: Path) -> list[str]:
    return [
        *["train", "--model", str(env["model"]), "--data_dir", str(env["data"])],
        *["--output_dir", str(out), "--variant", "adalora", "--rank", str(INIT_R)],
        *["--target_r", "2", "--tinit", "2", "--tfinal", "3", "--batch_size", "8"],
        *["--num_epochs", "3", "--max_length", "32", "--precision", "fp32"],
        *["--learning_rate", "1e-2", "--dropout", "0"],
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from conftest import save_tiny_model_dir, write_sentiment_rows

    root = tmp_path_factory.mktemp("adalora")
    write_sentiment_rows(root / "data" / "sst2" / "train.tsv", 48, seed=0)
    write_sentiment_rows(root / "data" / "sst2" / "validation.tsv", 16, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "data": root / "data", "root": root}


def test_training_adalora_ends_at_the_target_budget_and_peft_reads_the_adapter(
    env: dict[str, Path], tmp_path: Path, peft
) -> None:
    from transformers import AutoModelForSequenceClassification

    from lorakit.models import load_adapted_model

    out = tmp_path / "run"
    assert main(_train_args(env, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    ranks = summary["adalora_ranks"]
    assert sum(ranks.values()) == 2 * len(ranks) == summary["adalora_budget"]["end"]
    assert summary["adalora_budget"]["start"] == INIT_R * len(ranks)
    assert (out / "adalora_ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        f"AdaLoRA: {INIT_R * len(ranks)} → {2 * len(ranks)} triplets"
        in (out / "training_log.txt").read_text()
    )
    written = json.loads((out / "final" / "adapter_config.json").read_text())
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in written["rank_pattern"].items()} == ranks
    ours, tokenizer, _ = load_adapted_model(out / "final")
    base = AutoModelForSequenceClassification.from_pretrained(env["model"])
    theirs = peft.PeftModel.from_pretrained(base, out / "final").eval()
    inputs = tokenizer(["good movie", "awful plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5
        )


def test_ctrl_c_then_resume_reproduces_an_adalora_run(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    full, split = tmp_path / "full", tmp_path / "split"
    assert main(_train_args(env, full)) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 10)  # mid budget: some triplets masked
        assert main(_train_args(env, split)) == 130
    assert main(["train", "--resume", "--output_dir", str(split)]) == 0
    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(split / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    configs = [json.loads((d / "final" / "adapter_config.json").read_text()) for d in (full, split)]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (full, split)]
    assert summaries[0]["adalora_ranks"] == summaries[1]["adalora_ranks"]
