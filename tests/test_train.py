"""Training end to end on the offline base: lora, qlora, prefix; config errors; Ctrl-C; eval; export."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from adapterdeck.core.adapters import load_adapter, read_adapter
from adapterdeck.core.config import parse_config
from adapterdeck.core.demo import demo_config, write_demo_dataset
from adapterdeck.core.encode import IGNORE, encode
from adapterdeck.core.formats import Conversation, Message
from adapterdeck.core.train import TrainResult, run_training

from .conftest import run_cli

PROBE = "Hi, this is Lena. The app crashes with the router (order 4242). Not urgent."


@pytest.fixture(scope="module")
def support_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "support.jsonl", task="support", n=240)


def config_for(base: Path, data: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    config = demo_config(base, data, out)
    config["train"].update({"epochs": 3, "eval_steps": 4, "logging_steps": 2})
    config["eval"] = {"evaluators": ["loss", "exact_match"], "samples": 3}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[section] = value
    return config


def probe_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = torch.tensor([tokenizer(PROBE, add_special_tokens=False)["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def check_run(result: TrainResult, method: str, served_by: list[str]) -> dict[str, Any]:
    run = result.run_dir
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "succeeded"
    assert report["method"]["name"] == method and report["method"]["served_by"] == served_by
    training = report["training"]
    assert training["stop_reason"] in ("completed", "early_stopping")
    train_loss, val_loss = training["train_loss"], training["val_loss"]
    assert len(train_loss) >= 3 and len(val_loss) >= 2
    assert train_loss[-1]["loss"] < train_loss[0]["loss"]
    assert min(v["loss"] for v in val_loss) < val_loss[0]["loss"]
    assert training["best_step"] in [v["step"] for v in val_loss]
    assert training["best_val_loss"] == pytest.approx(min(v["loss"] for v in val_loss))
    metrics = report["test"]["metrics"]
    assert metrics["loss"]["tuned"]["value"] < metrics["loss"]["base"]["value"]
    assert "perplexity" in metrics["loss"]["tuned"]
    assert set(metrics) == {"loss", "exact_match"}
    assert len(report["samples"]) == 3
    assert {"prompt", "reference", "base", "base_few_shot", "tuned"} <= set(report["samples"][0])
    # The prompted base: zero-shot (as the data prompts it) and with 3 solved training examples.
    assert report["test"]["base_shots"] == 3 and len(report["test"]["shot_lines"]) == 3
    assert {"base", "base_few_shot", "tuned"} <= set(metrics["exact_match"])
    assert report["test"]["verdict"].startswith("exact_match: prompted base")
    assert report["training"]["precision"]["weights"] == "float32"
    assert report["data"]["sizes"] == {"train": 192, "validation": 24, "test": 24}
    assert len(report["data"]["sha256"]) == 64
    assert report["config"]["method"]["name"] == method
    assert {"python", "torch", "transformers", "peft", "adapterdeck"} <= set(report["versions"])
    assert {"validate", "load", "train", "evaluate", "total"} <= set(report["durations"])
    # The mean token accuracy is logged with each loss, at the same steps.
    train_accuracy, val_accuracy = training["train_mean_token_accuracy"], training["val_mean_token_accuracy"]
    for accuracy, loss in ((train_accuracy, train_loss), (val_accuracy, val_loss)):
        assert [p["step"] for p in accuracy] == [p["step"] for p in loss]
        assert all(0 <= p["accuracy"] <= 1 for p in accuracy)
    rows = list(csv.DictReader(io.StringIO((run / "step_metrics.csv").read_text())))
    assert {int(r["step"]) for r in rows} == {p["step"] for p in train_loss + val_loss}
    png = (run / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    meta = json.loads((adapter / "adapterdeck.json").read_text())
    assert meta["method"] == method and meta["served_by"] == served_by
    assert meta["base_fingerprint"].startswith("sha256:")
    return report


def test_lora_end_to_end(base_model: Path, support_data: Path, tmp_path: Path) -> None:
    config = parse_config(config_for(base_model, support_data, tmp_path / "run"))
    result = run_training(config)
    report = check_run(result, "lora", ["vllm", "peft"])
    # It learns to predict the answers (prefix tuning moves the tiny base too little to show it).
    accuracy = [p["accuracy"] for p in report["training"]["val_mean_token_accuracy"]]
    assert max(accuracy) > accuracy[0] + 0.3, accuracy
    adapter_config = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    # What vLLM serves: plain LoRA on the attention and MLP projections.
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    assert adapter_config["bias"] == "none" and not adapter_config.get("use_dora")
    assert not adapter_config.get("modules_to_save")
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(adapter_config["target_modules"]) == expected
    assert json.loads((result.run_dir / "report.json").read_text())["training"]["packing"] is True

    reloaded, tokenizer = load_adapter(read_adapter(result.run_dir))
    torch.testing.assert_close(
        probe_logits(reloaded, tokenizer), probe_logits(result.model, result.tokenizer)
    )


def test_qlora_end_to_end_and_merge(base_model: Path, support_data: Path, tmp_path: Path) -> None:
    config = parse_config(
        config_for(base_model, support_data, tmp_path / "run", method={"name": "qlora", "r": 8})
    )
    result = run_training(config)
    check_run(result, "qlora", ["vllm", "peft"])
    trained = probe_logits(result.model, result.tokenizer)

    import bitsandbytes as bnb

    reloaded, tokenizer = load_adapter(read_adapter(result.run_dir))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())  # reloaded onto the 4-bit base
    torch.testing.assert_close(probe_logits(reloaded, tokenizer), trained)

    merged_dir = tmp_path / "merged"
    done = run_cli("export", str(result.run_dir), "--merge", "--out", str(merged_dir))
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    # Merged onto the dequantized weights the adapter was trained against: same outputs.
    torch.testing.assert_close(probe_logits(merged, tokenizer), trained, atol=2e-3, rtol=1e-3)


def test_prefix_end_to_end(base_model: Path, support_data: Path, tmp_path: Path) -> None:
    config = parse_config(
        config_for(base_model, support_data, tmp_path / "run", method={"name": "prefix", "virtual_tokens": 8})
    )
    config.train.learning_rate = None  # the method's default
    result = run_training(config)
    report = check_run(result, "prefix", ["peft"])
    assert report["training"]["packing"] is False  # a prefix is a KV cache: packed rows would share it
    assert report["training"]["learning_rate"] == 1e-2
    assert (
        json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"]
        == "PREFIX_TUNING"
    )
    reloaded, tokenizer = load_adapter(read_adapter(result.run_dir))
    torch.testing.assert_close(
        probe_logits(reloaded, tokenizer), probe_logits(result.model, result.tokenizer)
    )

    refused = run_cli("export", str(result.run_dir), "--merge", "--out", str(tmp_path / "merged"))
    assert refused.returncode == 2
    assert "PREFIX_TUNING adapters cannot be merged" in refused.stderr


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(trian=c.pop("train")), "trian: unknown key (did you mean 'train'?)"),
        (lambda c: c["data"].update(fromat="chat"), "data.fromat: unknown key (did you mean 'format'?)"),
        (lambda c: c["method"].update(rank=4), "method.rank: unknown key (did you mean 'r'?)"),
        (lambda c: c["train"].update(batch_size="big"), "train.batch_size: Input should be a valid integer"),
        (lambda c: c["method"].update(name="lorra"), "method.name: unknown method 'lorra'"),
        (lambda c: c["eval"].update(evaluators=["bleu"]), "eval.evaluators.0: unknown evaluator 'bleu'"),
        (lambda c: c.pop("base"), "base: required key is missing"),
    ],
)
def test_config_errors_name_the_key_before_any_model_loads(
    tmp_path: Path, mutate: Any, expected: str
) -> None:
    config = demo_config(Path("/nonexistent/base"), Path("data.jsonl"), Path("run"))
    mutate(config)
    result = run_cli("train", str(write_yaml(tmp_path / "run.yaml", config)))
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    assert "nonexistent" not in result.stderr  # failed before touching the base model
    assert not (tmp_path / "run").exists()


def test_bad_data_trains_nothing(base_model: Path, support_data: Path, tmp_path: Path) -> None:
    lines = support_data.read_text().splitlines()[:40]
    lines[4] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    lines[9] = "{broken"
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = write_yaml(tmp_path / "run.yaml", config_for(base_model, data, tmp_path / "run"))
    result = run_cli("train", str(config))
    assert result.returncode == 2
    assert "line 5: no assistant turn" in result.stderr and "line 10: invalid JSON" in result.stderr
    assert "nothing was trained" in result.stderr
    assert not (tmp_path / "run").exists()


def test_early_stopping_keeps_the_best_checkpoint(
    base_model: Path, support_data: Path, tmp_path: Path
) -> None:
    overrides = {"early_stopping": {"patience": 1, "min_delta": 100.0}, "train.eval_steps": 3}
    result = run_training(parse_config(config_for(base_model, support_data, tmp_path / "run", **overrides)))
    training = result.report["training"]
    assert training["stop_reason"] == "early_stopping"
    assert training["steps"] < training["planned_steps"]
    # The second evaluation did not improve by min_delta: patience 1 stops right there.
    assert [v["step"] for v in training["val_loss"]] == [3, 6] and training["steps"] == 6
    # The best checkpoint is still the lowest validation loss, and adapter/ holds it.
    best = min(training["val_loss"], key=lambda v: v["loss"])
    assert training["best_step"] == best["step"]
    assert training["best_val_loss"] == pytest.approx(best["loss"])


def test_ctrl_c_leaves_a_usable_adapter_and_says_so(
    base_model: Path, support_data: Path, tmp_path: Path
) -> None:
    overrides = {"train.max_steps": 5000, "train.eval_steps": 5}
    config = write_yaml(
        tmp_path / "run.yaml", config_for(base_model, support_data, tmp_path / "run", **overrides)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterdeck.core.cli", "train", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.exists() and any(checkpoints.glob("checkpoint-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not reach a checkpoint"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, output
    assert "stopping after this step" in output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "interrupted" and report["training"]["stop_reason"] == "interrupted"
    assert 5 <= report["training"]["steps"] < 5000
    model, tokenizer = load_adapter(read_adapter(tmp_path / "run"))
    assert torch.isfinite(probe_logits(model, tokenizer)).all()


def test_eval_command_on_any_data(base_model: Path, support_data: Path, tmp_path: Path) -> None:
    result = run_training(parse_config(config_for(base_model, support_data, tmp_path / "run")))
    held_out = write_demo_dataset(tmp_path / "more.jsonl", task="support", n=20, seed=7)
    done = run_cli(
        "eval",
        str(result.run_dir),
        "--data",
        str(held_out),
        "--evaluators",
        "loss,exact_match,rouge_l",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["data"]["examples"] == 20
    metrics = payload["metrics"]
    assert set(metrics) == {"loss", "exact_match", "rouge_l"}
    assert metrics["rouge_l"]["tuned"]["value"] > metrics["rouge_l"]["base"]["value"]
    # Shots for the few-shot base come from the run's own training data.
    assert payload["base_shots"] == 3 and payload["shots_from"] == str(support_data)
    assert "base_few_shot" in metrics["exact_match"] and payload["verdict"]
    no_shots = run_cli("eval", str(result.run_dir), "--data", str(held_out), "--shots", "0", "--json")
    assert no_shots.returncode == 0, no_shots.stderr
    assert "base_few_shot" not in json.loads(no_shots.stdout)["metrics"]["exact_match"]
    assert metrics["loss"]["tuned"]["value"] < metrics["loss"]["base"]["value"]


def test_explicit_splits_and_mixed_in_general_data(base_model: Path, tmp_path: Path) -> None:
    train = write_demo_dataset(tmp_path / "train.jsonl", task="support", n=80, seed=1)
    val = write_demo_dataset(tmp_path / "val.jsonl", task="support", n=10, seed=2)
    test = write_demo_dataset(tmp_path / "test.jsonl", task="support", n=12, seed=3)
    general = write_demo_dataset(tmp_path / "general.jsonl", task="sentiment", n=100, seed=4)
    config = config_for(base_model, train, tmp_path / "run", **{"train.max_steps": 2, "train.eval_steps": 1})
    config["data"].update(
        validation=str(val), test=str(test), mix={"file": str(general), "ratio": 0.2}, format="chat"
    )
    report = run_training(parse_config(config)).report
    # 80 task examples make 80% of the training data; 20 general ones the other 20%.
    assert report["data"]["sizes"] == {"train": 100, "validation": 10, "test": 12}
    assert report["data"]["mix"]["examples"] == 20 and report["data"]["mix"]["ratio"] == 0.2
    assert [Path(f["path"]).name for f in report["data"]["files"]] == [
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
    ]
    assert report["test"]["examples"] == 12


def _validation_accuracy_by_hand(model: Any, tokenizer: Any, path: Path) -> tuple[int, int]:
    """Each validation example alone, position by position: is the argmax of the logits at i its
    label (answer token) at i + 1?"""
    predicted = tokens = 0
    model.eval()
    for line in path.read_text().splitlines():
        messages = tuple(Message(m["role"], m["content"]) for m in json.loads(line)["messages"])
        row = encode(tokenizer, Conversation(messages=messages))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        for i, label in enumerate(row["labels"][1:]):
            if label != IGNORE:
                tokens += 1
                predicted += int(int(logits[i].argmax()) == label)
    return predicted, tokens


def test_token_accuracy_is_the_share_of_answer_tokens_predicted(base_model: Path, tmp_path: Path) -> None:
    train = write_demo_dataset(tmp_path / "train.jsonl", task="support", n=80, seed=1)
    val = write_demo_dataset(tmp_path / "val.jsonl", task="support", n=10, seed=2)
    test = write_demo_dataset(tmp_path / "test.jsonl", task="support", n=4, seed=3)
    # float32: the by-hand count below runs without autocast, and on a CPU that computes bf16
    # natively the run would validate under bf16 autocast (a few tokens' argmax differ).
    overrides = {
        "train.max_steps": 8,
        "train.eval_steps": 4,
        "train.logging_steps": 2,
        "train.dtype": "float32",
    }
    config = config_for(base_model, train, tmp_path / "run", **overrides)
    config["data"].update(validation=str(val), test=str(test), format="chat")
    config["eval"] = {"evaluators": ["loss"], "samples": 0, "base_shots": 0, "cache_base": False}
    result = run_training(parse_config(config))
    training = result.report["training"]
    assert [p["step"] for p in training["train_mean_token_accuracy"]] == [2, 4, 6, 8]
    assert [p["step"] for p in training["val_mean_token_accuracy"]] == [4, 8]
    # Validation's is over the whole split, by the model at that step: the kept (best) one's is the
    # share of the split's answer tokens that the returned model predicts.
    predicted, tokens = _validation_accuracy_by_hand(result.model, result.tokenizer, val)
    assert 0 < predicted < tokens
    best = next(p for p in training["val_mean_token_accuracy"] if p["step"] == training["best_step"])
    assert best["accuracy"] == pytest.approx(predicted / tokens)
    # The run's step_metrics.csv: a fine-tuning job's results file, step for step with the report.
    rows = list(csv.DictReader(io.StringIO((result.run_dir / "step_metrics.csv").read_text())))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    for row, point in zip(rows, training["train_mean_token_accuracy"], strict=True):
        assert float(row["train_accuracy"]) == point["accuracy"]
    assert [float(r["valid_mean_token_accuracy"]) for r in rows if r["valid_loss"]] == [
        p["accuracy"] for p in training["val_mean_token_accuracy"]
    ]


def test_the_shipped_general_data_mixes_in_by_name(
    base_model: Path, support_data: Path, tmp_path: Path
) -> None:
    config = config_for(base_model, support_data, tmp_path / "run", **{"train.max_steps": 2})
    config["data"]["mix"] = {"file": "builtin:general", "ratio": 0.2}
    config["eval"] = {"evaluators": ["loss"], "samples": 0, "base_shots": 0}
    report = run_training(parse_config(config)).report
    mix = report["data"]["mix"]
    assert Path(mix["file"]).name == "general_mix.jsonl" and mix["examples"] == 48
    assert report["data"]["sizes"]["train"] == 192 + 48


def test_the_same_config_gives_the_same_run(base_model: Path, support_data: Path, tmp_path: Path) -> None:
    losses = []
    for name in ("a", "b"):
        config = config_for(
            base_model, support_data, tmp_path / name, **{"train.max_steps": 4, "train.eval_steps": 2}
        )
        config["eval"] = {"evaluators": ["loss"], "samples": 0}
        report = run_training(parse_config(config)).report
        losses.append([p["loss"] for p in report["training"]["train_loss"]])
    assert losses[0] == losses[1]


def test_bf16_autocast_trains_on_the_cpu(base_model: Path, support_data: Path, tmp_path: Path) -> None:
    """What ``train.dtype: auto`` picks on a CPU with native bf16, run on any CPU (emulated where not)."""
    config = parse_config(
        config_for(
            base_model,
            support_data,
            tmp_path / "run",
            **{"train.dtype": "bfloat16", "train.max_steps": 4, "train.eval_steps": 2},
        )
    )
    result = run_training(config)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["status"] == "succeeded"
    assert report["training"]["precision"] == {
        "weights": "float32",
        "autocast": "bfloat16",
        "why": report["training"]["precision"]["why"],
    }
    assert report["training"]["steps"] == 4
    # The adapter's weights stay float32: only the matmuls ran in bf16.
    reloaded, _ = load_adapter(read_adapter(result.run_dir))
    lora = [p for n, p in reloaded.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
