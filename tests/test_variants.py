"""rsLoRA, DoRA, IA³ and LoRA+: parity with PEFT both ways, exact merges, refusals."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import make_batch, make_model

from lorakit import LoraKitError, load_adapter, mark_only_lora_as_trainable, save_adapter
from lorakit.inject import apply_ia3_to_model, apply_lora_to_model, lora_layers
from lorakit.state import merge_lora_weights, unmerge_lora_weights

TARGETS = ["query", "key", "value", "dense"]
VARIANTS = ["rslora", "dora", "ia3"]


def _ours(variant: str, seed: int = 7) -> torch.nn.Module:
    """A tiny BERT with the variant applied and every trainable tensor moved off its init."""
    model = make_model("bert")
    if variant == "ia3":
        apply_ia3_to_model(model)
    else:
        apply_lora_to_model(
            model,
            TARGETS,
            rank=4,
            alpha=8,
            use_rslora=variant == "rslora",
            use_dora=variant == "dora",
        )
    mark_only_lora_as_trainable(model)
    _perturb(model, seed)
    return model.eval()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _peft_config(peft, variant: str):  # noqa: ANN001, ANN202
    if variant == "ia3":
        return peft.IA3Config(task_type="SEQ_CLS")
    return peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
    )


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_batch()).logits


def _base_dir(tmp_path: Path) -> Path:
    make_model("bert").save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("variant", VARIANTS)
def test_lorakit_variant_loads_in_peft(tmp_path: Path, variant: str, peft) -> None:  # noqa: ANN001
    from transformers import AutoModelForSequenceClassification

    ours = _ours(variant)
    save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("IA3" if variant == "ia3" else "LORA")
    assert config.get("use_dora", False) == (variant == "dora")
    base = AutoModelForSequenceClassification.from_pretrained(_base_dir(tmp_path))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_variant_loads_in_lorakit(tmp_path: Path, variant: str, peft, caplog) -> None:  # noqa: ANN001
    theirs = peft.get_peft_model(make_model("bert"), _peft_config(peft, variant))
    _perturb(theirs, 3)
    theirs.save_pretrained(tmp_path / "p")
    ours = make_model("bert")
    with caplog.at_level(logging.WARNING):
        load_adapter(ours, tmp_path / "p")
    assert "unknown keys" not in caplog.text  # PEFT's default-valued new keys load silently
    torch.testing.assert_close(_logits(ours.eval()), _logits(theirs.eval()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_is_exact_and_unmerge_restores_the_weights(variant: str) -> None:
    model = _ours(variant)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = _logits(model)
    merge_lora_weights(model)
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)
    merge_lora_weights(model)  # twice = once
    torch.testing.assert_close(_logits(model), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora_weights(model)
    after = dict(model.named_parameters())
    exact = variant != "rslora"  # DoRA and IA³ keep the original aside; LoRA subtracts sBA
    for name, value in before.items():
        if exact:
            assert torch.equal(after[name], value), name
        else:
            torch.testing.assert_close(after[name], value, atol=1e-6, rtol=0)


def test_dora_gradients_equal_peft(tmp_path: Path, peft) -> None:  # noqa: ANN001
    from transformers import AutoModelForSequenceClassification

    ours = _ours("dora")
    save_adapter(ours, tmp_path / "a")
    base = AutoModelForSequenceClassification.from_pretrained(_base_dir(tmp_path))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a", is_trainable=True)
    batch = {**make_batch(), "labels": torch.tensor([0, 1, 1])}
    for model in (ours, theirs):
        model.eval()  # no dropout: both see the same activations; gradients still flow
        model(**batch).loss.backward()
    mine = {
        re.sub(r"\.adapters\.default\.(\w+)$", r".\1", n): p.grad
        for n, p in ours.named_parameters()
        if p.requires_grad
    }
    compared = 0
    for name, p in theirs.named_parameters():
        if p.requires_grad and ("lora_" in name):
            key = re.sub(r"\.default(\.weight)?$", "", name.removeprefix("base_model.model."))
            torch.testing.assert_close(mine[key], p.grad, atol=1e-5, rtol=1e-5)
            compared += 1
    assert compared == 3 * 13  # A, B and magnitude of 2 x 6 layers and the pooler


def test_loraplus_groups_match_peft(peft) -> None:  # noqa: ANN001
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.train import param_groups

    ours = _ours("rslora")
    mine = {}
    for group in param_groups(ours, 1e-3, 0.01, 16):
        for p in group["params"]:
            mine[id(p)] = (group["lr"], group["weight_decay"])
    names = {id(p): n for n, p in ours.named_parameters()}
    theirs = peft.get_peft_model(make_model("bert"), _peft_config(peft, "rslora"))
    optimizer = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.01
    )
    peft_lr = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            peft_lr[id(p)] = (group["lr"], group["weight_decay"])
    by_role = {}
    for n, p in theirs.named_parameters():
        if id(p) in peft_lr:
            role = "B" if "lora_B" in n else "A" if "lora_A" in n else n.rsplit(".", 1)[-1]
            by_role.setdefault(role, set()).add(peft_lr[id(p)])
    for pid, value in mine.items():
        n = names[pid]
        role = "B" if "lora_B" in n else "A" if "lora_A" in n else n.rsplit(".", 1)[-1]
        assert by_role[role] == {value}, (n, value, by_role[role])


def test_rslora_written_as_plain_lora_for_runtimes_that_ignore_it(tmp_path: Path, peft) -> None:  # noqa: ANN001
    from transformers import AutoModelForSequenceClassification

    ours = _ours("rslora")
    save_adapter(ours, tmp_path / "a", plain_lora=True)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == pytest.approx(8 * 2)
    base = AutoModelForSequenceClassification.from_pretrained(_base_dir(tmp_path))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=1e-5, rtol=1e-5)


REFUSED = [
    ({"init_lora_weights": "pissa"}, "rewrites the base"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base"),
    ({"init_lora_weights": "olora"}, "rewrites the base"),
    ({"init_lora_weights": "corda"}, "rewrites the base"),
    ({"init_lora_weights": "loftq"}, "rewrites the base"),
    ({"init_lora_weights": "lora_ga"}, "rewrites the base"),
    ({"use_bdlora": {"block_size": 4}}, "BD-LoRA"),
    ({"kasa_config": {"x": 1}}, "KaSA"),
    ({"monteclora_config": {"x": 1}}, "MonteCLoRA"),
    ({"velora_config": {"x": 1}}, "VeLoRA"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
]


@pytest.mark.parametrize(("change", "message"), REFUSED)
def test_peft_features_lorakit_lacks_are_refused(
    tmp_path: Path,
    change: dict,
    message: str,
    peft,  # noqa: ANN001
) -> None:
    theirs = peft.get_peft_model(make_model("bert"), _peft_config(peft, "rslora"))
    theirs.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    model = make_model("bert")
    with pytest.raises(LoraKitError, match=message) as err:
        load_adapter(model, tmp_path / "p")
    assert "\n" not in str(err.value)
    assert not list(lora_layers(model))


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from conftest import save_tiny_model_dir, write_sentiment_rows

    root = tmp_path_factory.mktemp("variants")
    data = root / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 32, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 8, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "data": data}


@pytest.mark.parametrize(
    "flags",
    [["--variant", "dora"], ["--use_rslora", "--loraplus_lr_ratio", "16"], ["--variant", "ia3"]],
)
def test_every_command_takes_every_variant(
    tiny_env: dict[str, Path], tmp_path: Path, flags: list[str], capsys
) -> None:  # noqa: ANN001
    from lorakit.cli import main

    out = tmp_path / "run"
    args = ["--model", str(tiny_env["model"]), "--data_dir", str(tiny_env["data"])]
    train = ["train", *args, "--output_dir", str(out), "--num_epochs", "1", "--batch_size", "8"]
    assert main([*train, "--rank", "4", "--max_length", "16", *flags]) == 0
    log = (out / "training_log.txt").read_text()
    assert re.search(r"Parameter Statistics \((DoRA|rsLoRA r=4 \+ LoRA\+ x16|IA³)", log)
    best = str(out / "best")
    assert main(["eval", "--adapter", best, "--data_dir", str(tiny_env["data"]), "--json"]) == 0
    assert main(["predict", "--adapter", best, "--mode", "text", "--text", "good", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["probs"]) == {
        "negative",
        "positive",
    }
    assert main(["merge", "--adapter", best, "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--adapter", best, "--out", str(tmp_path / "m.onnx")]) == 0
    assert "largest" in capsys.readouterr().out  # both checked against the unmerged model


def test_merge_plain_lora_writes_the_equivalent_adapter(tmp_path: Path, capsys, peft) -> None:  # noqa: ANN001
    from transformers import AutoModelForSequenceClassification

    from lorakit.cli import main

    ours = _ours("rslora")
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="tiny")
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(tmp_path / "a"),
                "--out",
                str(tmp_path / "p"),
                "--plain_lora",
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == pytest.approx(16)
    base = AutoModelForSequenceClassification.from_pretrained(_base_dir(tmp_path))
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "p").eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    args = ["merge", "--adapter", str(tmp_path / "p"), "--out", str(tmp_path / "q"), "--plain_lora"]
    assert main(args) == 1
    assert "plain LoRA already" in capsys.readouterr().err
