"""The prompted base beside the tuned model (zero-shot, few-shot), the verdict drawn from them,
evaluators with their own probe set, and the precision ``train.dtype: auto`` picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterdeck.core import precision
from adapterdeck.core.evaluate import (
    BASE,
    FEW_SHOT,
    TUNED,
    compare,
    pick_shots,
    prompt_verdict,
    with_shots,
)
from adapterdeck.core.formats import Conversation, Message
from adapterdeck.core.plugins import catalog


def conv(user: str, answer: str, system: str | None = "Label it.", line: int = 0) -> Conversation:
    messages = [Message("system", system)] if system else []
    messages += [Message("user", user), Message("assistant", answer)]
    return Conversation(tuple(messages), line=line)


def test_shots_go_after_the_system_prompt_and_before_the_question() -> None:
    shots = [conv("a", "A", line=1), conv("b", "B", system="Another system prompt.", line=2)]
    shown = with_shots(conv("q", "Q"), shots)
    assert [(m.role, m.content) for m in shown.messages] == [
        ("system", "Label it."),
        ("user", "a"),
        ("assistant", "A"),
        ("user", "b"),
        ("assistant", "B"),
        ("user", "q"),
        ("assistant", "Q"),
    ]
    assert shown.reference == "Q"
    no_system = with_shots(conv("q", "Q", system=None), shots[:1])
    assert [m.role for m in no_system.messages] == ["user", "assistant", "user", "assistant"]
    assert with_shots(conv("q", "Q"), []) == conv("q", "Q")


def test_shots_are_seeded_and_bounded() -> None:
    pool = [conv(str(i), str(i), line=i) for i in range(50)]
    assert pick_shots(pool, 3, seed=0) == pick_shots(pool, 3, seed=0)
    assert pick_shots(pool, 3, seed=0) != pick_shots(pool, 3, seed=1)
    assert len(pick_shots(pool[:2], 5)) == 2
    assert pick_shots(pool, 0) == [] and pick_shots([], 3) == []


def _metrics(zero: float, few: float | None, tuned: float) -> dict:
    entry = {"higher_is_better": True, BASE: {"value": zero}, TUNED: {"value": tuned}}
    if few is not None:
        entry[FEW_SHOT] = {"value": few}
    return {"loss": {BASE: {"value": 2.0}, TUNED: {"value": 0.1}}, "exact_match": entry}


@pytest.mark.parametrize(
    ("zero", "few", "tuned", "expect"),
    [
        (0.6, 0.9, 0.99, ["prompted base 90%", "few-shot", "already close", "tuning pays here"]),
        (0.92, 0.9, 0.9, ["prompted base 92%", "zero-shot", "did not beat prompting"]),
        (0.1, 0.2, 0.4, ["far off", "tuning alone may not fix this task"]),
        (0.0, 0.0, 0.97, ["far off", "here it did"]),
        (0.4, 0.5, 0.8, ["part of the way", "tuning adds"]),
        (0.4, None, 0.8, ["prompted base 40%", "zero-shot"]),
    ],
)
def test_the_verdict_follows_the_measured_figures(
    fresh_plugins: None, zero: float, few: float | None, tuned: float, expect: list[str]
) -> None:
    evaluators = [catalog().evaluator(n) for n in ("loss", "exact_match")]
    verdict = prompt_verdict(_metrics(zero, few, tuned), evaluators)
    assert verdict is not None
    assert verdict.startswith("exact_match: prompted base")
    for part in expect:
        assert part in verdict, verdict


def test_no_verdict_without_a_generated_metric(fresh_plugins: None) -> None:
    assert prompt_verdict(_metrics(0.1, 0.1, 0.9), [catalog().evaluator("loss")]) is None


def test_the_prompted_base_and_own_probe_sets_are_scored(fresh_plugins: None, base_model: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterdeck.core.basemodel import load_tokenizer
    from adapterdeck.core.dataset import load_examples
    from adapterdeck.core.demo import write_demo_dataset

    tokenizer = load_tokenizer(str(base_model))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    path = write_demo_dataset(base_model.parent / "shots.jsonl", task="sentiment", n=12)
    examples = load_examples(path).examples
    general = catalog().evaluator("general")
    evaluators = [catalog().evaluator("loss"), catalog().evaluator("exact_match"), general]
    result = compare(
        model,
        tokenizer,
        examples[3:],
        evaluators,
        base_context=model.disable_adapter,
        shots=examples[:3],
        max_new_tokens=8,
        samples=2,
    )
    loss, exact, probes = result.metrics["loss"], result.metrics["exact_match"], result.metrics["general"]
    assert {BASE, FEW_SHOT, TUNED} <= set(loss) and {BASE, FEW_SHOT, TUNED} <= set(exact)
    # The few-shot prompt changes what the base sees, so its loss is another figure than zero-shot's.
    assert loss[FEW_SHOT]["value"] != loss[BASE]["value"]
    # The probe set is scored on the base and the tuned model (not few-shot), with its own size.
    assert probes["examples"] == 100 and FEW_SHOT not in probes
    assert 0 <= probes[BASE]["value"] <= 1 and 0 <= probes[TUNED]["value"] <= 1
    assert probes["delta"] == pytest.approx(probes[TUNED]["value"] - probes[BASE]["value"])
    assert {BASE, FEW_SHOT, TUNED} <= set(result.samples[0])
    assert len(result.outputs[FEW_SHOT].predictions) == len(examples) - 3


def test_auto_precision_uses_bf16_only_where_the_cpu_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    plain = precision.choose_precision("auto")
    assert (plain.load, plain.autocast) == ("float32", None)
    assert "no native bf16" in plain.describe()
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["amx_bf16", "avx512_bf16"])
    fast = precision.choose_precision("auto")
    assert (fast.load, fast.autocast) == ("float32", "bfloat16")
    assert "amx_bf16" in fast.describe()
    assert precision.choose_precision("float32").autocast is None
    forced = precision.choose_precision("bfloat16")
    assert (forced.load, forced.autocast) == ("float32", "bfloat16")


def test_the_cpu_flags_are_read_from_this_machine() -> None:
    flags = precision.cpu_bf16_flags()
    assert set(flags) <= {"amx_bf16", "avx512_bf16"}
    text = Path("/proc/cpuinfo").read_text()
    assert ("amx_bf16" in flags) == (" amx_bf16" in text)
