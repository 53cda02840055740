"""Adapters on the Hugging Face Hub: fetching one by id, sharing one with a generated card."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lorakit.atomic import readable, write_text
from lorakit.errors import LoraKitError

ADAPTER_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "lorakit.json",  # labels and task: PEFT has no key for them
    "README.md",
]


def resolve_adapter(name: str | Path) -> Path:
    """The local directory of an adapter given as a directory or as a Hub id (``owner/name``).

    A Hub id is fetched into the Hugging Face cache (the adapter files only); the cached copy
    is used when HF_HUB_OFFLINE is set or the Hub is unreachable. Anything that is not a
    Hub id comes back as a path, for ``read_adapter_config`` to judge.
    """
    from huggingface_hub import snapshot_download

    repo_id = str(name)
    local = readable(name)  # a swap a crash interrupted leaves the complete copy aside
    if local.exists() or not _looks_like_repo_id(repo_id):
        return local
    online = not hub_offline() and hub_reachable()
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=ADAPTER_FILES, local_files_only=not online
        )
    except Exception as e:  # noqa: BLE001 - network, auth, HTTP and cache errors all end here
        raise LoraKitError(_fetch_error(repo_id, e, online)) from None
    if not (Path(folder) / ADAPTER_FILES[0]).is_file():
        raise LoraKitError(f"Hub repository {repo_id} holds no {ADAPTER_FILES[0]}: not an adapter")
    return Path(folder)


def in_hub_cache(name: str, filename: str) -> bool:
    """True when the Hugging Face cache holds ``filename`` of the repository ``name``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, filename), str)
    except Exception:  # noqa: BLE001 - a malformed id is just "not cached"
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the Hub endpoint (the Hub client itself retries for ~30 s)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: only the cache may be read."""
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def _fetch_error(repo_id: str, e: Exception, online: bool) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    local = f"adapter {repo_id!r} is neither a local directory"
    if hub_offline():
        return f"{local} nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    if not online:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return (
            f"{local} nor cached, and the Hugging Face Hub ({endpoint}) could not be reached "
            "to download it; check the network (or HF_ENDPOINT) or give an adapter directory"
        )
    if isinstance(e, (RepositoryNotFoundError, GatedRepoError)):
        return f"{local} nor a repository on the Hub you can read (private? `hf auth login`)"
    first = (str(e).splitlines() or [""])[0]
    return f"downloading adapter {repo_id!r} from the Hub failed ({type(e).__name__}): {first}"


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

    write_text(adapter_dir / "README.md", card)
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
