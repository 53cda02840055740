"""Many adapters over one base: mixed batches score each row as that adapter alone would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_adapter import make_adapter, make_base, make_three_label_adapter

from lorakit import LoraKitError, apply_lora_to_model, save_adapter
from lorakit.data import collate, encode_texts
from lorakit.inject import lora_layers
from lorakit.models import load_adapted_model
from lorakit.multi import AdapterSet

SINGLE = ["the movie was good", "not a great film", "fine", "bad bad bad movie, not fine at all"]
PAIRS = [("the film was fine", "the movie was good"), ("not good", "great")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[AdapterSet, dict[str, Path]]:
    root = tmp_path_factory.mktemp("multi")
    base = make_base(root / "base")
    dirs = {
        "sst2": make_adapter(root / "sst2", base),
        "mrpc": make_adapter(root / "mrpc", base, task="mrpc", seed=5),
        "grades": make_three_label_adapter(root / "grades", base),
    }
    adapters = AdapterSet(str(base))
    for name, d in dirs.items():
        adapters.load(name, d)
    return adapters, dirs


def _alone(directory: Path, rows: list[tuple[str, ...]]) -> list[np.ndarray]:
    """Each row's logits from the adapter loaded alone into its own model (lorakit predict)."""
    model, tokenizer, _ = load_adapted_model(directory)
    out = []
    for row in rows:
        batch = collate(encode_texts([row], tokenizer, 32), np.arange(1))
        del batch["labels"]
        with torch.no_grad():
            out.append(model(**batch).logits[0].numpy())
    return out


def test_mixed_batch_rows_match_each_adapter_alone(served) -> None:  # noqa: ANN001
    adapters, dirs = served
    rows: list[tuple[str, ...]] = []
    names: list[str] = []
    for i in range(4):  # interleaved, so grouping by adapter really reorders rows
        rows += [(SINGLE[i],), PAIRS[i % 2], (SINGLE[3 - i],)]
        names += ["sst2", "mrpc", "grades"]
    data = encode_texts(rows, adapters.tokenizer, 32)
    batch = {k: v.numpy() for k, v in collate(data, np.arange(len(rows))).items()}
    del batch["labels"]
    mixed = adapters.logits(batch, names)
    for name in dirs:
        idx = [i for i, n in enumerate(names) if n == name]
        want = _alone(dirs[name], [rows[i] for i in idx])
        for i, w in zip(idx, want, strict=True):
            assert mixed[i].shape == w.shape
            np.testing.assert_allclose(mixed[i], w, atol=1e-5, rtol=1e-5)
    assert {a.ranks for a in adapters.adapters.values()} == {(4,), (2,)}
    assert adapters.adapters["grades"].labels == ("low", "mid", "high")


def test_a_misfit_is_refused_and_the_set_is_untouched(served, tmp_path: Path) -> None:  # noqa: ANN001
    adapters, _ = served
    other = make_base(tmp_path / "wide", hidden=48)
    from transformers import AutoModelForSequenceClassification

    wide = AutoModelForSequenceClassification.from_pretrained(other)  # 48 wide, not 32
    apply_lora_to_model(wide, ["query"], rank=4, alpha=8)
    bad = save_adapter(wide, tmp_path / "bad")
    before = {n: p.clone() for n, p in adapters.model.named_parameters()}
    with pytest.raises(LoraKitError, match="shape"):
        adapters.load("bad", bad)
    with pytest.raises(LoraKitError, match="already loaded"):
        adapters.load("sst2", bad)
    after = dict(adapters.model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert "bad" not in adapters.adapters


def test_unload_removes_only_that_adapter(served, tmp_path: Path) -> None:  # noqa: ANN001
    adapters, dirs = served
    adapters.load("extra", dirs["sst2"])
    adapters.unload("extra")
    assert "extra" not in adapters.adapters
    assert all("extra" not in s.heads for s in adapters.switches.values())
    assert all("extra" not in layer.adapters for _, layer in lora_layers(adapters.model))
    assert all("sst2" in layer.adapters for _, layer in lora_layers(adapters.model))
    with pytest.raises(LoraKitError, match="no adapter named"):
        adapters.unload("extra")


def test_variants_mix_in_one_batch(tmp_path: Path) -> None:
    """rsLoRA, DoRA and IA³ adapters share the base and a batch with plain LoRA."""
    from conftest import make_model

    from lorakit import mark_only_lora_as_trainable
    from lorakit.inject import apply_ia3_to_model

    base = make_base(tmp_path / "base")
    dirs = {"plain": make_adapter(tmp_path / "plain", base)}
    for i, variant in enumerate(("rslora", "dora", "ia3")):
        model = make_model("bert")
        if variant == "ia3":
            apply_ia3_to_model(model)
        else:
            apply_lora_to_model(
                model,
                ["query", "value", "dense"],
                rank=2 + i,
                alpha=4,
                use_rslora=variant == "rslora",
                use_dora=variant == "dora",
            )
        mark_only_lora_as_trainable(model)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        extra = {"max_length": 32}
        dirs[variant] = save_adapter(model, tmp_path / variant, str(base), "sst2", extra)
    adapters = AdapterSet(str(base))
    for name, d in dirs.items():
        adapters.load(name, d)
    names = [n for _ in range(2) for n in dirs]
    rows = [(SINGLE[i % len(SINGLE)],) for i in range(len(names))]
    data = encode_texts(rows, adapters.tokenizer, 32)
    batch = {k: v.numpy() for k, v in collate(data, np.arange(len(rows))).items()}
    del batch["labels"]
    mixed = adapters.logits(batch, names)
    for i, name in enumerate(names):
        np.testing.assert_allclose(mixed[i], _alone(dirs[name], [rows[i]])[0], atol=1e-5, rtol=1e-5)
    assert adapters.adapters["dora"].variant == "DoRA" and adapters.adapters["ia3"].variant == "IA³"


def _mixed_batch(
    adapters: AdapterSet, n: int, group: int = 3
) -> tuple[dict[str, np.ndarray], list[str]]:
    """``n`` rows, each text repeated for ``group`` rows in a row; adapters round-robin."""
    rows = [(SINGLE[(i // group) % 4],) for i in range(n)]
    data = encode_texts(rows, adapters.tokenizer, 32)
    batch = {k: v.numpy() for k, v in collate(data, np.arange(n)).items()}
    del batch["labels"]
    return batch, [("sst2", "mrpc", "grades")[i % 3] for i in range(n)]


def test_gathered_layers_equal_the_per_adapter_loop_and_follow_reloads(
    served,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lorakit.mixed

    adapters, dirs = served
    batch, names = _mixed_batch(adapters, 9)
    gathered = adapters.logits(batch, names)
    stacks = adapters.router.stacks
    assert any(
        stacks.get(layer, (0, None))[1] is not None for _, layer in lora_layers(adapters.model)
    )
    with monkeypatch.context() as m:
        m.setattr(lorakit.mixed, "stacked", lambda layer, router: None)  # one update per adapter
        looped = adapters.logits(batch, names)
    for g, want in zip(gathered, looped, strict=True):
        np.testing.assert_allclose(g, want, atol=1e-5, rtol=1e-5)
    # Another adapter's weights under the same name: the stacks are rebuilt, not reused.
    adapters.unload("mrpc")
    try:
        adapters.load("mrpc", dirs["sst2"])
        again = adapters.logits(batch, names)
        for i in range(1, 9, 3):  # the "mrpc" rows now score as the "sst2" ones
            np.testing.assert_allclose(again[i], gathered[i - 1], atol=1e-5, rtol=1e-5)
    finally:
        adapters.unload("mrpc")
        adapters.load("mrpc", dirs["mrpc"])


def test_an_adapter_trained_with_dropout_is_served_without_it(served, tmp_path: Path) -> None:  # noqa: ANN001
    import json
    import shutil

    adapters, dirs = served
    noisy = tmp_path / "noisy"
    shutil.copytree(dirs["sst2"], noisy)
    config = json.loads((noisy / "adapter_config.json").read_text())
    config["lora_dropout"] = 0.5
    (noisy / "adapter_config.json").write_text(json.dumps(config))
    adapters.load("noisy", noisy)
    try:
        batch, _ = _mixed_batch(adapters, 6, group=2)
        names = ["noisy", "sst2"] * 3
        first, second = adapters.logits(batch, names), adapters.logits(batch, names)
        for i in range(0, 6, 2):  # deterministic, and equal to the same weights without dropout
            np.testing.assert_array_equal(first[i], second[i])
            np.testing.assert_allclose(first[i], first[i + 1], atol=1e-5, rtol=1e-5)
    finally:
        adapters.unload("noisy")
