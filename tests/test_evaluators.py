"""The built-in evaluators: loss, exact_match, json_valid, rouge_l."""

from __future__ import annotations

import math

import pytest

from adapterdeck.core.evaluators import EvalSample, Evaluator
from adapterdeck.core.plugins import catalog

BUILTIN_EVALUATORS = (
    "loss", "exact_match", "first_word", "first_line", "preference_accuracy", "json_valid", "rouge_l",
)  # fmt: skip


def sample(reference: str = "ref", prediction: str | None = None, loss: float | None = None) -> EvalSample:
    return EvalSample(
        prompt=[{"role": "user", "content": "q"}], reference=reference, prediction=prediction, loss=loss
    )


def scores(evaluator: Evaluator, reference: str, *predictions: str | None) -> list[float]:
    return [evaluator.score(sample(reference, p)) for p in predictions]


def test_builtin_evaluators_are_registered(fresh_plugins: None) -> None:
    cat = catalog()
    assert not [p for p in cat.problems if p.origin.builtin]
    for name in BUILTIN_EVALUATORS:
        registered = cat.evaluators[name]
        assert registered.origin.label == "built-in"
        assert registered.origin.plugin == "adapterdeck.plugins.evaluators"
        assert registered.obj.name == name
        description = registered.obj.description
        assert description and "\n" not in description


def test_loss(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("loss")
    assert evaluator.needs_generation is False
    assert evaluator.higher_is_better is False

    losses = [evaluator.score(sample(loss=x)) for x in (1.0, 2.0, 4.5)]
    assert losses == [1.0, 2.0, 4.5]
    assert evaluator.aggregate(losses) == pytest.approx(2.5)
    assert evaluator.details(losses) == {"perplexity": pytest.approx(math.exp(2.5))}
    # The prediction plays no part.
    assert evaluator.score(sample(prediction="anything", loss=0.25)) == 0.25

    assert evaluator.details([0.0]) == {"perplexity": 1.0}
    assert evaluator.details([1000.0, 2000.0]) == {"perplexity": math.inf}  # exp overflows
    assert math.isnan(evaluator.aggregate([]))
    assert math.isnan(evaluator.details([])["perplexity"])


def test_loss_without_a_loss_is_an_error(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("loss")
    with pytest.raises(ValueError, match=r"'loss' evaluator needs .*sample\.loss is None"):
        evaluator.score(sample(prediction="text"))


def test_exact_match(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("exact_match")
    assert evaluator.needs_generation and evaluator.higher_is_better
    assert scores(evaluator, "Paris", "Paris", "  Paris\n", "\tParis ") == [1.0, 1.0, 1.0]
    assert scores(evaluator, " Paris\n", "Paris") == [1.0]
    assert scores(evaluator, "Paris", "paris", "Paris.", "Pa ris", "", None) == [0.0] * 5
    assert scores(evaluator, "", "", "  ", "x") == [1.0, 1.0, 0.0]
    assert evaluator.aggregate([1.0, 0.0, 1.0, 0.0]) == 0.5
    assert evaluator.details([1.0, 0.0]) == {}


def test_first_word(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("first_word")
    assert evaluator.needs_generation and evaluator.higher_is_better and not evaluator.needs_loss
    reference = "420. Each hour has 60 minutes, and 7 × 60 = 420."
    assert scores(evaluator, reference, "420", "420 minutes.", " 420, because", '"420".') == [1.0] * 4
    assert scores(evaluator, reference, "There are 420 minutes", "4200.", "", None) == [0.0] * 4
    assert scores(evaluator, "Positive: it works", "positive!", "negative") == [1.0, 0.0]
    assert scores(evaluator, "", "", "x") == [0.0, 0.0]  # an empty reference has no first word


def test_first_line(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("first_line")
    assert evaluator.needs_generation and evaluator.higher_is_better and not evaluator.needs_loss
    reference = "TL;DR: Paris.\n\nParis has been the capital of France since 987."
    right = ("TL;DR: Paris.", "tl;dr:  paris\nThe rest differs.", "\n  TL;DR: Paris!\n\nWhy.")
    assert scores(evaluator, reference, *right) == [1.0] * 3
    wrong = ("TL;DR: Lyon.\n\nParis has been the capital", "Paris.", "TL;DR: Paris is the capital.", "", None)
    assert scores(evaluator, reference, *wrong) == [0.0] * 5
    assert scores(evaluator, "", "", "x") == [0.0, 0.0]  # an empty reference has no first line


def test_json_valid(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("json_valid")
    assert evaluator.needs_generation and evaluator.higher_is_better
    valid = ('{"a": [1, 2]}', " 3 ", '"s"', "null", "[]", "-1.5e3", "true")
    assert scores(evaluator, "{}", *valid) == [1.0] * len(valid)
    invalid = ("not json", "", "   ", "{'a': 1}", '{"a": 1', "NaN", "Infinity", "-Infinity", "[1, NaN]", None)
    assert scores(evaluator, "{}", *invalid) == [0.0] * len(invalid)
    # Far too deeply nested to decode: invalid, not a crash.
    assert scores(evaluator, "{}", "[" * 100_000 + "]" * 100_000) == [0.0]
    assert evaluator.aggregate([1.0, 1.0, 0.0, 0.0]) == 0.5


def test_rouge_l(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("rouge_l")
    assert evaluator.needs_generation and evaluator.higher_is_better
    reference = "the cat sat on the mat"
    assert scores(evaluator, reference, reference, "The cat sat on the mat.") == [1.0, 1.0]
    assert scores(evaluator, reference, "dogs bark loudly outside") == [0.0]
    assert scores(evaluator, reference, "", "   ", None) == [0.0, 0.0, 0.0]
    # LCS "the cat the mat" = 4 tokens; precision 4/5, recall 4/6, F = 2PR / (P + R) = 8/11.
    (partial,) = scores(evaluator, reference, "the cat ate the mat")
    assert partial == pytest.approx(8 / 11)
    assert evaluator.aggregate([1.0, 0.0, partial]) == pytest.approx((1 + 8 / 11) / 3)


def test_rouge_l_builds_its_scorer_once(fresh_plugins: None) -> None:
    evaluator = catalog().evaluator("rouge_l")
    assert evaluator._scorer is None  # type: ignore[attr-defined]  # nothing built until first use
    evaluator.score(sample("a b", "a b"))
    scorer = evaluator._scorer  # type: ignore[attr-defined]
    assert scorer is not None
    evaluator.score(sample("a b c", "a c"))
    assert evaluator._scorer is scorer  # type: ignore[attr-defined]
