"""Training objectives as plugins: the ``preference`` format, ``dpo`` (TRL) on the tiny base, the
``register_objectives`` hook, and what is refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapterdeck.core import hookimpl
from adapterdeck.core.config import parse_config
from adapterdeck.core.dataset import validate_file
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import PREFERENCES
from adapterdeck.core.methods import MethodParams, TuningMethod
from adapterdeck.core.objectives import ObjectiveParams, TrainerParts, TrainingObjective
from adapterdeck.core.plugins import ObjectiveRegister, catalog, register_plugin, unregister_plugin
from adapterdeck.core.train import run_training

WORDS = [
    "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "forest", "candle", "rocket",
    "garden", "silver", "ocean", "window", "dragon", "pepper", "marble", "thunder", "violet", "castle",
]  # fmt: skip


def pair_line(prompt: str, preferred: str, rejected: str) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": prompt}]},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def write_pairs(path: Path) -> Path:
    """80 pairs, half of them preferring the answer with the extra "not": the base finds one
    side more likely by length alone, so it is right on about half, and only learning the
    preference gets the rest."""
    lines = []
    for w in WORDS:
        for ask in ("Is {w} a word?", "Is {w} really a word?"):
            lines.append(pair_line(ask.format(w=w), f"Yes, {w} is a word.", f"No, {w} is not a word."))
        for ask in ("Is {w} a number?", "Is {w} really a number?"):
            lines.append(pair_line(ask.format(w=w), f"No, {w} is not a number.", f"Yes, {w} is a number."))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def dpo_config(base: Path, data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "base": str(base),
        "data": {"train": [str(data)]},
        "objective": {"name": "dpo", "beta": 0.1},
        "train": {"max_steps": 16, "batch_size": 8, "learning_rate": 3e-3, "eval_steps": 4},
        "eval": {"evaluators": ["loss"], "base_shots": 0, "samples": 2},
        "output": str(out),
        **extra,
    }


# -- the preference format -------------------------------------------------------------------------


def test_preference_lines_are_validated_line_by_line(tmp_path: Path) -> None:
    good = pair_line("Capital of France?", "Paris.", "Well, it is a large city in Europe...")
    rows = [
        good,
        pair_line("2+2?", "4", "4"),
        {"input": {"messages": [{"role": "assistant", "content": "hi"}]},
         "preferred_output": [{"role": "user", "content": "x"}]},
        {"input": {"messages": [{"role": "user", "content": "ok"}], "tools": []}, "preferred_output": [],
         "non_preferred_output": [{"role": "assistant", "content": " "}], "extra": 1},
        {"input": "hello", "preferred_output": {"role": "assistant"},
         "non_preferred_output": [{"role": "assistant", "content": "no"}]},
        good,
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_file(path)
    assert report.format == "preference" and len(report.examples) == 1
    errors = {e.line: " | ".join(e.reasons) for e in report.errors}
    assert sorted(errors) == [2, 3, 4, 5, 6]
    assert "preferred_output and non_preferred_output are the same answer" in errors[2]
    assert "the input's last message is from 'assistant'; it must be from the user" in errors[3]
    assert "preferred_output: the message is from 'user'; it must be from the assistant" in errors[3]
    assert "missing 'non_preferred_output'" in errors[3]
    for part in ("unknown key 'extra'", "input: unknown key 'tools'",
                 "'preferred_output' must hold exactly one assistant message, got 0",
                 "non_preferred_output 1: empty content"):  # fmt: skip
        assert part in errors[4]
    assert "'input' must be an object, got string" in errors[5]
    assert "'preferred_output' must be an array of one assistant message, got object" in errors[5]
    assert errors[6] == "duplicate of line 1"
    example = report.examples[0]
    assert example.reference == "Paris."
    assert example.rejected is not None and example.rejected.reference.startswith("Well,")
    assert example.prompt == [{"role": "user", "content": "Capital of France?"}]


def test_a_pair_whose_longer_answer_is_over_the_limit_is_refused(tmp_path: Path, base_model: Path) -> None:
    from adapterdeck.core.basemodel import load_tokenizer, token_counter

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pair_line("Hi", "Hello.", "word " * 300)) + "\n")
    report = validate_file(path, token_counter=token_counter(load_tokenizer(str(base_model))), max_tokens=64)
    assert not report.examples
    assert "over the limit of 64" in report.errors[0].reasons[0]


# -- the run config and what is refused before a model loads --------------------------------------


def test_objective_errors_name_the_key_before_any_model_loads(tmp_path: Path, base_model: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl")
    base = dpo_config(base_model, data, tmp_path / "run")
    with pytest.raises(
        AdapterdeckError, match=r"objective.name: unknown objective 'dop'.*did you mean 'dpo'"
    ):
        parse_config({**base, "objective": {"name": "dop"}})
    with pytest.raises(AdapterdeckError, match=r"objective.beta: Input should be greater than 0"):
        parse_config({**base, "objective": {"name": "dpo", "beta": 0}})
    with pytest.raises(AdapterdeckError, match=r"objective.gamma: unknown key"):
        parse_config({**base, "objective": {"name": "dpo", "gamma": 1}})
    with pytest.raises(
        AdapterdeckError, match="chat data holds conversations; objective 'dpo' trains on preferences"
    ):
        parse_config({**base, "data": {"train": [str(data)], "format": "chat"}})
    assert parse_config({**base, "objective": "dpo"}).objective.name == "dpo"
    assert parse_config({k: v for k, v in base.items() if k != "objective"}).objective.name == "sft"


def write_chat(path: Path, n: int = 30) -> Path:
    """``n`` chat lines: data of the conversations kind, which a preference objective refuses."""
    path.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            )
            + "\n"
            for i in range(n)
        )
    )
    return path


def test_chat_data_for_dpo_is_refused_and_nothing_is_trained(tmp_path: Path, base_model: Path) -> None:
    chat = write_chat(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    with pytest.raises(
        AdapterdeckError, match=r"chat\.jsonl: chat data holds conversations; objective 'dpo'"
    ):
        run_training(parse_config(dpo_config(base_model, chat, out)))
    assert not (out / "adapter").exists() and not (out / "report.json").exists()


# -- dpo on the tiny base --------------------------------------------------------------------------


def test_dpo_raises_the_held_out_preference_accuracy(tmp_path: Path, base_model: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl")
    result = run_training(parse_config(dpo_config(base_model, data, tmp_path / "run")))
    report = result.report
    assert report["status"] == "succeeded"
    assert report["objective"] == {
        "name": "dpo",
        "params": {"beta": 0.1, "label_smoothing": 0.0, "sft_weight": 0.0},
    }
    accuracy = report["test"]["metrics"]["preference_accuracy"]  # added by the objective
    assert accuracy["base"]["value"] <= 0.75, accuracy
    assert accuracy["tuned"]["value"] >= 0.9, accuracy
    rewards = report["training"]["objective_metrics"]["validation"]["rewards/accuracies"]
    assert rewards and rewards[-1]["value"] >= 0.9
    margins = report["training"]["objective_metrics"]["train"]["rewards/margins"]
    assert margins and margins[-1]["value"] > 0
    assert report["training"]["val_loss"][-1]["loss"] < report["training"]["val_loss"][0]["loss"]
    meta = json.loads((tmp_path / "run" / "adapter" / "adapterdeck.json").read_text())
    assert meta["objective"]["name"] == "dpo" and meta["format"] == "preference"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    # Only the trained adapter is saved, not DPO's frozen reference copy of it.
    assert sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterdeck.json",
    ]  # fmt: skip


# -- the hook --------------------------------------------------------------------------------------


class ScaledParams(ObjectiveParams):
    scale: float = 1.0


class ScaledSft(TrainingObjective):
    """A third party's objective: supervised, but refusing one method with a reason."""

    name = "scaled-sft"
    params = ScaledParams

    def refuses(self, method: TuningMethod, method_params: MethodParams) -> str | None:
        return "it scales LoRA updates only" if method.name == "prefix" else None

    def build_trainer(self, parts: TrainerParts, params: ObjectiveParams) -> Any:
        return catalog().objective("sft").build_trainer(parts, params)


def test_hook_register_objectives(fresh_plugins: None, tmp_path: Path, base_model: Path) -> None:
    class NoKinds(ScaledSft):
        name = "no-kinds"
        data_kinds = ()

    class Plugin:
        @hookimpl
        def register_objectives(self, register: ObjectiveRegister) -> None:
            register.add_objective(ScaledSft())
            register.add_objective(NoKinds())

    register_plugin(Plugin(), name="scaled-plugin")
    try:
        cat = catalog()
        assert {"sft", "dpo", "scaled-sft"} <= set(cat.objectives)
        assert cat.objectives["scaled-sft"].origin.label == "registered in code"
        assert cat.objective("dpo").data_kinds == (PREFERENCES,)
        assert "no-kinds" not in cat.objectives
        assert any("must name the kinds of data it trains on" in p.error for p in cat.problems)
        chat = tmp_path / "chat.jsonl"
        chat.write_text(
            json.dumps(
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
            )
            + "\n"
        )
        config = {"base": str(base_model), "data": {"train": [str(chat)]}, "output": str(tmp_path / "r"),
                  "objective": {"name": "scaled-sft", "scale": 2}}  # fmt: skip
        assert parse_config(config).objective_params().scale == 2
        with pytest.raises(
            AdapterdeckError, match="objective 'scaled-sft' cannot train method 'prefix': it scales LoRA"
        ):
            parse_config({**config, "method": "prefix"})
    finally:
        unregister_plugin("scaled-plugin")
