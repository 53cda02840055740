"""`lorakit train` end to end on a tiny model: files, loss, resume, Ctrl-C, hub, eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import interrupt_at, save_tiny_model_dir, write_sentiment_rows
from safetensors.torch import load_file

from lorakit.adapter import read_adapter_config
from lorakit.cli import main
from lorakit.config import Config, load_config
from lorakit.train import OUTPUTS, Loop


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    write_sentiment_rows(data / "sst2" / "train.tsv", 48, seed=0)
    write_sentiment_rows(data / "sst2" / "validation.tsv", 16, seed=1)
    return {"model": save_tiny_model_dir(root / "model"), "data": data, "root": root}


def _args(env: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(env["model"]),
        "--data_dir",
        str(env["data"]),
        "--output_dir",
        str(out),
        "--batch_size",
        "8",
        "--learning_rate",
        "1e-2",
        "--num_epochs",
        "2",
        "--logging_steps",
        "2",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--precision",
        "fp32",
        *extra,
    ]


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_train_writes_the_promised_files_and_learns(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_args(env, out, "--num_epochs", "4")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    for d in ("best", "final", "checkpoint/adapter"):
        assert sorted(p.name for p in (out / d).iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "lorakit.json",
        ]
    train = _records(out, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["examples_per_sec"] > 0 for r in train)
    assert len(_records(out, "eval")) == 4
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "best_eval_accuracy",
        "best_epoch",
        "train_examples_per_sec",
        "train_runtime_s",
        "peak_rss_mb",
        "trainable_params",
        "total_params",
    ):
        assert summary[key], key
    assert summary["best_eval_accuracy"] == max(r["accuracy"] for r in _records(out, "eval"))
    log = (out / "training_log.txt").read_text()
    assert "Parameter Statistics" in log and "Best model saved" in log
    config = (out / "config.yaml").read_text()
    assert "rank: 4" in config and "learning_rate: 0.01" in config
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    adapter = read_adapter_config(out / "best")
    assert adapter["id2label"] == {"0": "negative", "1": "positive"} and adapter["task"] == "sst2"


def test_a_change_of_thread_count_is_logged(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lorakit.train

    threads = torch.get_num_threads()
    polls = []

    class Busy:  # other processes take all but one core from the second step on
        def describe(self) -> str:
            return f"{threads} threads"

        def poll(self) -> int:
            polls.append(1)
            torch.set_num_threads(1 if len(polls) >= 2 else threads)
            return torch.get_num_threads()

    monkeypatch.setattr(lorakit.train, "thread_governor", lambda: Busy())
    out = tmp_path / "run"
    try:
        assert main(_args(env, out, "--num_epochs", "1")) == 0
    finally:
        torch.set_num_threads(threads)
    log = (out / "training_log.txt").read_text()
    if threads > 1:
        assert f"⚙ step 2: 1 torch thread (was {threads})" in log
    assert log.count("⚙") == (1 if threads > 1 else 0)  # said once, not at every step


def test_ctrl_c_then_resume_reproduces_uninterrupted_run(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(_args(env, full)) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 9)  # mid epoch 2 (6 steps per epoch)
        assert main(_args(env, split)) == 130
    state = json.loads((split / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == 9 and state["epoch"] == 1
    assert not (split / "final").exists()
    assert main(["train", "--resume", "--output_dir", str(split)]) == 0
    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(split / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert _records(full, "eval") == _records(split, "eval")
    assert [r["loss"] for r in _records(full, "train")] == pytest.approx(
        [r["loss"] for r in _records(split, "train")], abs=1e-5
    )


def test_resume_refuses_settings_that_change_the_run(
    env: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        assert main(_args(env, out)) == 130
    before = (out / "checkpoint" / "trainer_state.json").read_text()
    capsys.readouterr()
    resume = ["train", "--resume", "--output_dir", str(out)]
    assert main([*resume, "--batch_size", "4", "--lora_r", "2", "--seed", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for change in ("training.batch_size 8 -> 4", "lora.rank 4 -> 2", "training.seed 42 -> 1"):
        assert change in err
    assert (out / "checkpoint" / "trainer_state.json").read_text() == before  # untouched
    # Where files go and how progress is logged may change; the run then finishes.
    assert main([*resume, "--logging_steps", "1"]) == 0


def test_fp16_loss_scale_survives_resume(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        assert main(_args(env, out, "--precision", "fp16")) == 130
    path = out / "checkpoint" / "optimizer.pt"
    blob = torch.load(path, weights_only=True)
    assert blob["scaler"]["scale"] > 0 and "cpu" in blob["rng"]
    blob["scaler"]["scale"] = 1024.0  # as if overflows had lowered it: must come back as is
    torch.save(blob, path)
    seen = []
    original = Loop._epochs

    def record_scale(self: Loop) -> None:
        seen.append(self.scaler.get_scale())
        original(self)

    monkeypatch.setattr(Loop, "_epochs", record_scale)
    assert main(["train", "--resume", "--output_dir", str(out)]) == 0
    assert seen == [1024.0]


def test_output_dir_guard(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_args(env, out)) == 1
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and len(err.splitlines()) == 1
    assert main(_args(env, out, "--resume")) == 1
    assert (out / "keep.txt").read_text() == "mine"
    assert main(_args(env, out, "--overwrite", "--num_epochs", "1")) == 0
    assert (out / "keep.txt").read_text() == "mine"  # only our own files are replaced


def test_custom_csv_with_string_labels(env: dict[str, Path], tmp_path: Path) -> None:
    rows = ["text,sentiment"]
    for i in range(24):
        word, label = [("awful", "neg"), ("great", "pos"), ("movie", "meh")][i % 3]
        rows.append(f"the {word} plot,{label}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(rows[:7]) + "\n")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(env["model"]),
            "--dataset",
            "csv",
            "--train_file",
            str(tmp_path / "train.csv"),
            "--validation_file",
            str(tmp_path / "val.csv"),
            "--text_columns",
            "text",
            "--label_column",
            "sentiment",
            "--output_dir",
            str(out),
            "--num_epochs",
            "1",
            "--batch_size",
            "8",
        ]
    )
    assert code == 0
    adapter = read_adapter_config(out / "best")
    assert adapter["id2label"] == {"0": "meh", "1": "neg", "2": "pos"}
    assert adapter["num_labels"] == 3 and adapter["text_columns"] == ["text"]


def test_eval_command_matches_training_eval(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(_args(env, out, "--num_epochs", "1")) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(out / "final"),
                "--data_dir",
                str(env["data"]),
                "--precision",
                "fp32",
                "--json",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    final = _records(out, "eval")[-1]
    assert metrics["examples"] == 16
    assert metrics["accuracy"] == final["accuracy"]
    assert metrics["loss"] == pytest.approx(final["loss"], abs=1e-5)


def test_push_to_hub_uploads_best_with_card(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple] = []

    class FakeApi:
        def create_repo(self, repo_id: str, private: bool, exist_ok: bool) -> None:
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path: str, repo_id: str, commit_message: str) -> None:
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = tmp_path / "run"
    assert (
        main(
            _args(
                env,
                out,
                "--num_epochs",
                "1",
                "--push_to_hub",
                "--hub_model_id",
                "me/tiny-lora",
                "--hub_private",
            )
        )
        == 0
    )
    assert calls[0] == ("create", "me/tiny-lora", True)
    assert calls[1] == (
        "upload",
        "me/tiny-lora",
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "lorakit.json"],
    )
    card = (out / "best" / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "sst2" in card and "| accuracy |" in card


def _final_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def test_gradient_accumulation_equals_larger_batch(env: dict[str, Path], tmp_path: Path) -> None:
    common = ("--dropout", "0", "--no-group_by_length", "--num_epochs", "1")
    assert main(_args(env, tmp_path / "big", *common, "--batch_size", "16")) == 0
    assert (
        main(
            _args(
                env,
                tmp_path / "acc",
                *common,
                "--batch_size",
                "8",
                "--gradient_accumulation_steps",
                "2",
            )
        )
        == 0
    )
    big, acc = _final_tensors(tmp_path / "big"), _final_tensors(tmp_path / "acc")
    for k in big:
        torch.testing.assert_close(acc[k], big[k], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_same_result(env: dict[str, Path], tmp_path: Path) -> None:
    assert main(_args(env, tmp_path / "plain", "--num_epochs", "1")) == 0
    assert main(_args(env, tmp_path / "ckpt", "--num_epochs", "1", "--gradient_checkpointing")) == 0
    a, b = _final_tensors(tmp_path / "plain"), _final_tensors(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def _saved_activation_numel(checkpointing: bool, env: dict[str, Path]) -> int:
    """Elements autograd keeps for backward during one training forward of build_model's model."""
    from lorakit.config import load_config
    from lorakit.train import build_model

    config = load_config(
        None,
        {"model_name": str(env["model"]), "training.gradient_checkpointing": checkpointing},
    )
    model = build_model(config, ("negative", "positive"), torch.device("cpu")).train()
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel()
        return t

    ids = torch.randint(5, 17, (4, 24))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    return saved[0]


def test_gradient_checkpointing_keeps_fewer_activations(env: dict[str, Path]) -> None:
    plain, checkpointed = (_saved_activation_numel(c, env) for c in (False, True))
    # The recomputed layers save their activations only during backward's recompute, one
    # layer at a time; the forward pass keeps just each layer's input.
    assert checkpointed < 0.75 * plain, (checkpointed, plain)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_low_precision_reaches_the_matmuls_and_keeps_fp32_adapter(
    env: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    dtype: torch.dtype,
) -> None:
    import lorakit.train

    seen: set[torch.dtype] = set()
    original = lorakit.train.build_model

    def build_and_watch(*args: object, **kwargs: object) -> torch.nn.Module:
        model = original(*args, **kwargs)  # type: ignore[arg-type]
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        return model

    monkeypatch.setattr(lorakit.train, "build_model", build_and_watch)
    out = tmp_path / precision
    assert main(_args(env, out, "--num_epochs", "1", "--precision", precision)) == 0
    assert dtype in seen  # autocast reached the frozen matmuls
    assert all(t.dtype == torch.float32 for t in _final_tensors(out).values())
    assert all(r["loss"] == r["loss"] for r in _records(out, "train"))  # no NaN


def test_eval_steps_and_max_steps(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_args(env, out, "--eval_steps", "2", "--max_steps", "5")) == 0
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert json.loads((out / "summary.json").read_text())["global_steps"] == 5


def test_overwrite_with_bad_input_keeps_previous_run(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_args(env, out, "--num_epochs", "1")) == 0
    before = (out / "best" / "adapter_model.safetensors").read_bytes()
    assert main(_args(env, out, "--overwrite", "--task", "mrpc")) == 1  # no mrpc data here
    assert (out / "best" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)


@pytest.mark.parametrize("loraplus", [0.0, 16.0])
def test_weight_decay_spares_biases_norms_and_vectors(loraplus: float) -> None:
    from conftest import make_model

    from lorakit import apply_lora_to_model, mark_only_lora_as_trainable
    from lorakit.inject import apply_ia3_to_model
    from lorakit.train import param_groups

    model = make_model("bert")
    apply_lora_to_model(model, ["query"], 4, 8, use_dora=True)
    apply_ia3_to_model(model, ["value"], [])
    mark_only_lora_as_trainable(model, bias="all", modules_to_save=["LayerNorm"])
    decay = {}
    for group in param_groups(model, 1e-3, 0.01, loraplus):
        for p in group["params"]:
            decay[id(p)] = group["weight_decay"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == {id(p) for p in trainable.values()}
    for name, p in trainable.items():
        matrix = name.endswith(("lora_A", "lora_B", "classifier.weight"))
        assert decay[id(p)] == (0.01 if matrix else 0.0), name
    kinds = {n.rsplit(".", 1)[-1] for n in trainable if decay[id(trainable[n])] == 0.0}
    assert {"bias", "lora_magnitude_vector", "ia3_l"} <= kinds


def test_resume_maps_saved_tensors_to_the_cpu_first(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose tensors name a device this machine lacks (as a GPU run's name
    ``cuda:0``) resumes: they are loaded to the CPU, then moved where the run computes."""
    import torch.serialization as serialization

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        # While saving, every storage is tagged "elsewhere", a device no loader knows.
        m.setattr(serialization, "_package_registry", list(serialization._package_registry))
        serialization.register_package(1, lambda s: "elsewhere", lambda s, location: None)
        interrupt_at(m, 3)
        assert main(_args(env, out)) == 130
    path = out / "checkpoint" / "optimizer.pt"
    with pytest.raises(RuntimeError, match="elsewhere"):  # what torch.load does without a map
        torch.load(path, weights_only=True)
    assert main(["train", "--resume", "--output_dir", str(out)]) == 0
    assert (out / "final" / "adapter_model.safetensors").is_file()


def _config(env: dict[str, Path], out: Path, *extra: str) -> Config:
    """The configuration ``lorakit train`` builds from ``_args``' flags, for ``train`` itself."""
    import argparse

    from lorakit.commands.flags import config_overrides
    from lorakit.commands.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_config(None, config_overrides(parser.parse_args(_args(env, out, *extra)[1:])))


def _b_norm(out: Path) -> float:
    return sum(t.norm().item() for k, t in _final_tensors(out).items() if "lora_B" in k)


def test_hooks_join_the_loop_without_editing_it(env: dict[str, Path], tmp_path: Path) -> None:
    """Each kind of hook, attached through ``train(config, hooks=...)``: a loss term that
    changes what trains, gradients seen after backward, one call per optimizer step, and
    listeners that get every record metrics.jsonl holds."""
    from lorakit.train import Hooks, train

    def l2_on_b(model: torch.nn.Module, outputs: object) -> torch.Tensor:
        return sum(p.pow(2).sum() for n, p in model.named_parameters() if "lora_B" in n)

    grads: list[tuple[int, bool]] = []

    def see_grads(model: torch.nn.Module, step: int) -> None:
        lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        b = [g for n, g in lora.items() if "lora_B" in n]
        grads.append(
            (len(lora), all(g is not None for g in lora.values()) and all(g.any() for g in b))
        )

    steps: list[int] = []
    evals: list[tuple[dict, int]] = []
    lines: list[tuple[dict, int]] = []
    hooks = Hooks(
        loss_terms=[l2_on_b],
        after_backward=[see_grads],
        after_step=[lambda model, step: steps.append(step)],
        on_eval=[lambda record, step: evals.append((record, step))],
        on_train_log=[lambda record, step: lines.append((record, step))],
    )
    plain, pulled = tmp_path / "plain", tmp_path / "pulled"
    train(_config(env, plain))
    summary = train(_config(env, pulled), hooks=hooks)
    assert _b_norm(pulled) < 0.5 * _b_norm(plain)  # the L2 term pulled lora_B towards 0
    assert steps == list(range(1, summary["global_steps"] + 1)) and len(steps) == 12
    assert len(grads) == 12 and all(n > 0 and ok for n, ok in grads)
    assert [r for r, _ in evals] == _records(pulled, "eval") and len(evals) == 2
    assert [s for _, s in evals] == [r["step"] for r in _records(pulled, "eval")]
    assert [r for r, _ in lines] == _records(pulled, "train")


def test_a_checkpoint_with_other_optimizer_groups_is_a_clear_error(
    env: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A checkpoint of a lorakit that kept every trainable tensor in one AdamW group."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        assert main(_args(env, out)) == 130
    path = out / "checkpoint" / "optimizer.pt"
    blob = torch.load(path, weights_only=True)
    groups = blob["optimizer"]["param_groups"]
    groups[0]["params"] += [p for g in groups[1:] for p in g["params"]]
    blob["optimizer"]["param_groups"] = groups[:1]
    torch.save(blob, path)
    before = path.read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 parameter group(s), this run has 2" in err
    assert path.read_bytes() == before
