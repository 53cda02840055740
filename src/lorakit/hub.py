"""Sharing an adapter on the Hugging Face Hub, with a generated model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.errors import LoraKitError


def model_card(adapter_config: dict[str, Any], summary: dict[str, Any], repo_id: str) -> str:
    """A README.md for the adapter: base model, task, metrics, hyperparameters, how to load it."""
    base = adapter_config.get("base_model_name_or_path") or "unknown"
    task = adapter_config.get("task") or "text classification"
    labels = ", ".join((adapter_config.get("id2label") or {}).values())
    metrics = "\n".join(
        f"| {k} | {v:.4f} |"
        for k, v in summary.get("best_eval", {}).items()
        if isinstance(v, float)
    )
    return f"""---
library_name: peft
base_model: {base}
tags: [lorakit, lora, text-classification, {task}]
---

# {repo_id}

A LoRA adapter for `{base}` on **{task}** (labels: {labels}), trained with
[lorakit](https://pypi.org/project/lorakit/).

## Evaluation (best epoch {summary.get("best_epoch", "?")})

| metric | value |
|---|---|
{metrics}

## Training

| hyperparameter | value |
|---|---|
| LoRA rank / alpha / dropout | {adapter_config["r"]} / {adapter_config["lora_alpha"]} / {adapter_config.get("lora_dropout", 0)} |
| target modules | {", ".join(adapter_config["target_modules"])} |
| trainable parameters | {summary.get("trainable_params", "?"):,} of {summary.get("total_params", "?"):,} |
| epochs, batch size, learning rate | {summary.get("num_epochs")}, {summary.get("batch_size")}, {summary.get("learning_rate")} |

## Use it

With lorakit:

```bash
lorakit predict --adapter {repo_id} --mode text --text "A gorgeous, witty film."
```

With PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={adapter_config.get("num_labels", 2)})
model = PeftModel.from_pretrained(base, "{repo_id}")
```
"""


def push_adapter(adapter_dir: Path, repo_id: str, private: bool, card: str, api: Any = None) -> str:
    """Create the repository (if needed) and upload the adapter and its card; return the URL."""
    from huggingface_hub import HfApi

    (adapter_dir / "README.md").write_text(card, encoding="utf-8")
    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(adapter_dir),
            repo_id=repo_id,
            commit_message="Upload LoRA adapter trained with lorakit",
        )
    except Exception as e:  # noqa: BLE001 - network, auth and HTTP errors all end here
        raise LoraKitError(
            f"push to the Hub failed ({type(e).__name__}): {str(e).splitlines()[0]}"
        ) from None
    return f"https://huggingface.co/{repo_id}"
