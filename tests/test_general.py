"""The ``general`` evaluator: its shipped probes, its checks and its mix data (no model is loaded)."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from typing import Any

import pytest

from adapterdeck.core.dataset import load_examples
from adapterdeck.core.evaluators import EvalSample
from adapterdeck.core.formats import Conversation
from adapterdeck.core.plugins import catalog
from adapterdeck.plugins.general import CONDITIONS, check_answer

DATA = resources.files("adapterdeck.core").joinpath("data")
CATEGORIES = ("fact", "arithmetic", "format", "helpful")


def probe_records() -> list[dict[str, Any]]:
    lines = DATA.joinpath("general_probes.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_probes_are_100_with_25_per_category_and_unique_ids() -> None:
    records = probe_records()
    assert len(records) == 100
    assert Counter(r["category"] for r in records) == dict.fromkeys(CATEGORIES, 25)
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert set(r) == {"id", "category", "messages", "answer", "check"}
        assert r["id"].startswith(r["category"] + "-")
        assert r["messages"] and r["messages"][-1]["role"] == "user"
        assert all(m["role"] in ("system", "user") and m["content"].strip() for m in r["messages"])
        assert len(r["messages"][-1]["content"].split()) < 40
        assert isinstance(r["answer"], str) and r["answer"].strip()
        assert r["check"] and set(r["check"]) <= set(CONDITIONS)


@pytest.mark.parametrize("record", probe_records(), ids=lambda r: r["id"])
def test_every_probe_answer_passes_its_own_check(record: dict[str, Any]) -> None:
    assert check_answer(record["answer"], record["check"])


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        ({"contains_any": ["12"]}, "The answer is 12.", "The answer is 120."),
        ({"contains_any": ["12"]}, "12 + 0 = 12", "Python 3.12 is out"),
        ({"contains_any": ["12"]}, "twelve, or 12", "1,12"),
        ({"contains_any": ["Paris", "Lyon"]}, "It is paris, of course.", "Parisian food"),
        ({"contains_all": ["Tom", "30"]}, '{"name": "Tom", "age": 30}', '{"name": "Tom", "age": 300}'),
        ({"regex": r"^\W*yes\b"}, "Yes.", "Well, yes."),
        ({"regex": r"a.b"}, "A\nB", "ab"),
        ({"max_words": 3}, "one two three", "one two three four"),
        ({"starts_with": "Sure"}, '  "sure, here it is"', "Of course, sure."),
        ({"uppercase": True}, "WHITE, 100%", "White"),
        ({"uppercase": True}, "OK!", "123 ..."),
        ({"json_keys": ["color"]}, '{"color": "red"}', '{"colour": "red"}'),
        ({"json_keys": ["color"]}, 'Here you go: ```json\n{"color": "red"}\n``` done', '{"color": "red",}'),
        ({"json_keys": ["a", "b"]}, 'x {oops} {"a": 1, "b": 2} y', '["a", "b"]'),
        ({"no_refusal": True}, "Boil it for eight minutes.", "I'm sorry, I can't help with that."),
        ({"no_refusal": True}, "Sure: two apples.", "As an AI, I cannot do that."),
        ({"no_refusal": True}, "Here is a name: Luna.", "I’m sorry, but no."),
        ({"no_refusal": True}, "Yes", "   "),
        ({"contains_any": ["blue"], "max_words": 2}, "Blue.", "It is blue, I think."),
    ],
)
def test_each_condition_accepts_and_rejects(check: dict[str, Any], good: str, bad: str) -> None:
    assert check_answer(good, check)
    assert not check_answer(bad, check)


def test_every_condition_has_a_test() -> None:
    # Keep the parametrized cases above in step with the conditions check_answer knows.
    assert set(CONDITIONS) == {
        "contains_any",
        "contains_all",
        "regex",
        "max_words",
        "starts_with",
        "uppercase",
        "json_keys",
        "no_refusal",
    }


def test_an_unknown_condition_raises_naming_it() -> None:
    with pytest.raises(ValueError, match="lowercase"):
        check_answer("hi", {"contains_any": ["hi"], "lowercase": True})


def test_the_mix_has_300_valid_distinct_examples_disjoint_from_the_probes() -> None:
    path = DATA.joinpath("general_mix.jsonl")
    with resources.as_file(path) as file:
        report = load_examples(file)
    assert report.ok and report.format == "chat"
    assert report.lines == 300 and len(report.examples) == 300
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(set(lines)) == 300
    for conv in report.examples:
        assert conv.messages[-1].role == "assistant"
    mix_users = {m.content.strip().lower() for c in report.examples for m in c.messages if m.role == "user"}
    probe_users = {
        m["content"].strip().lower() for r in probe_records() for m in r["messages"] if m["role"] == "user"
    }
    assert not mix_users & probe_users


def test_the_general_evaluator_is_built_in_and_brings_its_probes(fresh_plugins: None) -> None:
    cat = catalog()
    assert not [p for p in cat.problems if p.origin.builtin]
    registered = cat.evaluators["general"]
    assert registered.origin.label == "built-in"
    assert registered.origin.plugin == "adapterdeck.plugins.general"
    evaluator = cat.evaluator("general")
    assert evaluator.higher_is_better is True
    assert evaluator.needs_generation is True
    assert evaluator.max_new_tokens == 48
    assert evaluator.description and "\n" not in evaluator.description

    probes = evaluator.examples()
    assert probes is not None and len(probes) == 100
    assert evaluator.examples() is probes  # loaded once
    records = {r["id"]: r for r in probe_records()}
    for conv in probes:
        assert isinstance(conv, Conversation)
        record = records[conv.meta["id"]]
        assert conv.meta == {"id": record["id"], "category": record["category"], "check": record["check"]}
        assert conv.prompt == record["messages"]
        assert conv.messages[-1].role == "assistant" and conv.reference == record["answer"]


def test_score_uses_the_samples_check(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("general")
    conv = evaluator.examples()[0]

    def sample(prediction: str | None, meta: dict[str, Any] | None = None) -> EvalSample:
        return EvalSample(
            conv.prompt, conv.reference, prediction=prediction, meta=conv.meta if meta is None else meta
        )

    assert evaluator.score(sample(conv.reference)) == 1.0
    assert evaluator.score(sample("I'm sorry, I can't answer that.")) == 0.0
    assert evaluator.score(sample(None)) == 0.0
    assert evaluator.aggregate([1.0, 0.0, 1.0, 1.0]) == 0.75
    assert evaluator.details([1.0, 0.0]) == {}
    with pytest.raises(ValueError, match="no 'check'"):
        evaluator.score(sample("Paris", meta={}))
    with pytest.raises(ValueError, match="'shouting'"):
        evaluator.score(sample("Paris", meta={"check": {"shouting": True}}))
