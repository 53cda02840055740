"""AdaLoRA adapters: PEFT's trained-and-masked adapters load with PEFT's logits, lorakit writes
them back in PEFT's format, and they merge, serve and convert to plain LoRA exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_model
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
