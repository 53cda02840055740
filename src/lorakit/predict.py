"""Prediction: a label and every label's probability for raw texts, from an adapter or ONNX.

A ``Predictor`` tokenizes, cuts length-sorted batches (least padding), hands each batch as
numpy arrays to a backend that returns logits, and softmaxes. The torch backend runs the
adapter merged into the base weights (plain layers: base-model speed) or, on request,
unmerged; the ONNX backend runs the graph ``lorakit export`` wrote, through onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorakit.batches import LogitsFn, run_logits, torch_logits_fn
from lorakit.data import DEFAULT_MAX_LENGTH, adapter_text_columns, encode_texts
from lorakit.errors import LoraKitError

Text = str | tuple[str, ...]  # one text, or a sentence pair for pair tasks

DEMO_SENTENCES = (
    "A gorgeous, witty, seductive movie.",
    "The plot is dull and the acting is even worse.",
    "This is not a bad film at all.",
    "I did not enjoy a single minute of it.",
    "The visuals are stunning, but the story falls completely flat.",
    "It starts slowly, yet the final act is genuinely moving.",
    "An instant classic that I will watch again and again.",
    "Two hours of my life I will never get back.",
    "Not the best, not the worst: just fine.",
    "The cast clearly had fun; too bad the audience won't.",
)
DEMO_PAIRS = (
    ("The company said profits rose 10% last year.", "Profits grew by ten percent last year."),
    ("He left the meeting early.", "He stayed until the meeting ended."),
    ("The storm closed every school in the city.", "All city schools shut because of the storm."),
    ("She bought a red car.", "She sold her old bicycle."),
    ("The drug was approved on Monday.", "Regulators cleared the medicine on Monday."),
    ("Stocks fell sharply on Friday.", "Shares did not move much on Friday."),
)


class Prediction(TypedDict):
    label: str  # the most probable label's name
    score: float  # its probability
    probs: dict[str, float]  # every label's probability
    truncated: bool  # the input was longer than max_length tokens and was cut


@dataclass
class Predictor:
    """Labels for texts through ``logits_fn``; build one with ``from_adapter`` or ``from_onnx``."""

    logits_fn: LogitsFn
    tokenizer: PreTrainedTokenizerBase
    id2label: dict[int, str]
    max_length: int = DEFAULT_MAX_LENGTH
    text_columns: tuple[str, ...] = ("sentence",)
    batch_size: int = 32
    pad_id: int = 0
    description: str = ""

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device | None = None,
        amp_dtype: torch.dtype | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        **fields: Any,
    ) -> Predictor:
        """A predictor over an in-memory classifier (LoRA-wrapped, merged or plain)."""
        config: Any = model.config
        limit = getattr(config, "max_position_embeddings", None)
        if limit and max_length > limit:
            raise LoraKitError(
                f"max_length {max_length} exceeds the model's {limit} positions; "
                "pass a smaller --max_length"
            )
        device = device or next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        fields.setdefault("id2label", {int(k): v for k, v in config.id2label.items()})
        fields.setdefault("pad_id", int(pad or 0))
        run = torch_logits_fn(model.eval(), device, amp_dtype)
        return cls(run, tokenizer, max_length=max_length, **fields)

    @classmethod
    def from_adapter(
        cls,
        adapter_dir: str | Path,
        model_name: str | None = None,
        merge: bool = True,
        device: str = "auto",
        precision: str = "auto",
        max_length: int | None = None,
        batch_size: int = 32,
        quantize_base: str | None = None,
    ) -> Predictor:
        """Base model + adapter; ``merge`` folds LoRA in and puts plain layers back, except
        over a quantized base (``quantize_base``, or as the adapter was trained), which would
        have to be dequantized: that runs unmerged."""
        from lorakit.models import load_adapted_model
        from lorakit.runtime import amp_dtype, pick_device
        from lorakit.state import unwrap_lora

        dev = pick_device(device)
        model, tokenizer, config = load_adapted_model(adapter_dir, model_name, dev, quantize_base)
        quantized = config["quantize_base"] != "none"
        merge = merge and not quantized
        if merge:
            unwrap_lora(model)
        amp = amp_dtype(precision, dev, "predict")
        return cls.from_model(
            model,
            tokenizer,
            dev,
            amp,
            max_length=max_length or int(config.get("max_length") or DEFAULT_MAX_LENGTH),
            text_columns=adapter_text_columns(config),
            batch_size=batch_size,
            description=f"adapter {adapter_dir} ({'merged' if merge else 'unmerged'}, "
            f"{dev}, {amp or torch.float32}"
            f"{', ' + config['quantize_base'] + ' base' if quantized else ''})".replace(
                "torch.", ""
            ),
        )

    @classmethod
    def from_onnx(
        cls, path: str | Path, max_length: int | None = None, batch_size: int = 32
    ) -> Predictor:
        """The graph ``lorakit export`` wrote, with the tokenizer and sidecar json beside it."""
        from lorakit.export import onnx_sidecar, onnx_tokenizer_dir, read_onnx_session
        from lorakit.models import load_tokenizer

        path = Path(path)
        session = read_onnx_session(path)
        sidecar = onnx_sidecar(path)
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            id2label = {int(k): str(v) for k, v in meta["id2label"].items()}
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise LoraKitError(
                f"{sidecar} (written by lorakit export beside the .onnx) is missing or "
                f"unreadable: {e}; export again"
            ) from None
        names = [i.name for i in session.get_inputs()]

        def run(batch: dict[str, np.ndarray]) -> np.ndarray:
            zeros = np.zeros_like(batch["input_ids"])
            logits = session.run(None, {n: batch.get(n, zeros) for n in names})[0]
            return np.asarray(logits, dtype=np.float32)

        return cls(
            run,
            load_tokenizer(str(onnx_tokenizer_dir(path))),
            id2label,
            max_length=max_length or int(meta.get("max_length", DEFAULT_MAX_LENGTH)),
            text_columns=tuple(meta.get("text_columns", ("sentence",))),
            batch_size=batch_size,
            pad_id=int(meta.get("pad_token_id") or 0),
            description=f"ONNX {path} (onnxruntime, cpu, "
            f"{'int8' if meta.get('quantization') == 'int8' else 'float32'})",
        )

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in sorted(self.id2label)]

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def check(self, text: Text) -> tuple[str, ...]:
        """``text`` as a tuple of one text per column; ``LoraKitError`` if empty or misshapen."""
        row = (text,) if isinstance(text, str) else tuple(text)
        if len(row) != len(self.text_columns):
            kind = "sentence pairs" if self.is_pair else "single texts"
            raise LoraKitError(
                f"this model classifies {kind} ({', '.join(self.text_columns)}), "
                f"got {len(row)} text(s)"
            )
        if any(not t.strip() for t in row):
            raise LoraKitError("the text is empty: there is nothing to classify")
        return row

    def predict(
        self, texts: Sequence[Text], on_batch: Callable[[int], None] | None = None
    ) -> list[Prediction]:
        """One ``Prediction`` per text, in order; ``on_batch(n)`` after each batch of n."""
        rows = [self.check(t) for t in texts]
        if not rows:
            return []
        data = encode_texts(rows, self.tokenizer, self.max_length, pad_id=self.pad_id)
        logits = run_logits(data, self.logits_fn, self.batch_size, on_batch)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)  # (n, labels)
        labels = self.labels
        return [
            Prediction(
                label=labels[int(p.argmax())],
                score=float(p.max()),
                probs={name: float(v) for name, v in zip(labels, p, strict=True)},
                truncated=bool(cut),
            )
            for p, cut in zip(probs, data.truncated, strict=True)
        ]
