"""The built-in evaluators: ``loss``, ``exact_match``, ``first_word``, ``first_line``,
``preference_accuracy``, ``json_valid`` and ``rouge_l``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterdeck.core import hookimpl
from adapterdeck.core.evaluators import EvalSample, Evaluator
from adapterdeck.core.plugins import EvaluatorRegister

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer


def _mean(scores: Sequence[float]) -> float:
    return sum(scores) / len(scores) if scores else float("nan")


class Loss(Evaluator):
    name = "loss"
    description = "mean per-token loss on the reference answers, no generation (also reports perplexity)"
    higher_is_better = False
    needs_generation = False

    def score(self, sample: EvalSample) -> float:
        if sample.loss is None:
            raise ValueError(
                "the 'loss' evaluator needs the sample's mean loss on the reference tokens, "
                "but sample.loss is None"
            )
        return float(sample.loss)

    def aggregate(self, scores: Sequence[float]) -> float:
        return _mean(scores)

    def details(self, scores: Sequence[float]) -> dict[str, float]:
        mean = _mean(scores)
        try:
            perplexity = math.exp(mean)
        except OverflowError:
            perplexity = float("inf")
        return {"perplexity": perplexity}


class ExactMatch(Evaluator):
    name = "exact_match"
    description = "1.0 when the answer equals the reference (ignoring surrounding whitespace), else 0.0"
    higher_is_better = True
    needs_generation = True
    needs_loss = False

    def score(self, sample: EvalSample) -> float:
        if sample.prediction is None:
            return 0.0
        return 1.0 if sample.prediction.strip() == sample.reference.strip() else 0.0


def first_word(text: str) -> str:
    """The first word of ``text``, without the punctuation around it and in lower case."""
    words = text.split(maxsplit=1)
    return words[0].strip(".,;:!?\"'()[]").lower() if words else ""


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, without the punctuation that ends it, in lower case
    and with its runs of whitespace as one space."""
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split()).rstrip(".!?").lower()
    return ""


class _LeadMatch(Evaluator):
    """1.0 when the answer begins as the reference does: the same ``lead`` of both, not empty."""

    higher_is_better = True
    needs_generation = True
    needs_loss = False

    @staticmethod
    def lead(text: str) -> str:
        raise NotImplementedError

    def score(self, sample: EvalSample) -> float:
        if sample.prediction is None:
            return 0.0
        expected = self.lead(sample.reference)
        return 1.0 if expected and self.lead(sample.prediction) == expected else 0.0


class FirstWord(_LeadMatch):
    name = "first_word"
    description = (
        "1.0 when the answer's first word is the reference's (case and punctuation ignored): "
        "the answer comes first"
    )
    lead = staticmethod(first_word)


class FirstLine(_LeadMatch):
    name = "first_line"
    description = (
        "1.0 when the answer's first line is the reference's (case, spacing and the closing "
        "punctuation ignored): a one-line answer first, and the right one"
    )
    lead = staticmethod(first_line)


class PreferenceAccuracy(Evaluator):
    name = "preference_accuracy"
    description = (
        "share of preference pairs whose preferred answer the model finds more likely than the "
        "non-preferred one (whole-answer log-likelihood, as DPO compares them)"
    )
    higher_is_better = True
    needs_generation = False
    needs_loss = False
    needs_preference = True

    def score(self, sample: EvalSample) -> float:
        if sample.margin is None:
            raise ValueError(
                "the 'preference_accuracy' evaluator needs preference pairs (the preference format), "
                "but this example has no non-preferred answer"
            )
        return 1.0 if sample.margin > 0 else 0.0


class JsonValid(Evaluator):
    name = "json_valid"
    description = "1.0 when the answer parses as a JSON value (NaN and Infinity do not), else 0.0"
    higher_is_better = True
    needs_generation = True
    needs_loss = False
    needs_reference = False

    def score(self, sample: EvalSample) -> float:
        if sample.prediction is None:
            return 0.0
        try:
            json.loads(sample.prediction, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return 0.0
        return 1.0


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN, Infinity and -Infinity; JSON does not.
    raise ValueError(f"{name} is not JSON")


class RougeL(Evaluator):
    name = "rouge_l"
    description = "ROUGE-L F-measure of the answer against the reference (longest common subsequence)"
    higher_is_better = True
    needs_generation = True
    needs_loss = False

    def __init__(self) -> None:
        self._scorer: RougeScorer | None = None

    def _get_scorer(self) -> RougeScorer:
        # Imported and built on first use: plugin modules load on every command.
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(["rougeL"])
        return self._scorer

    def score(self, sample: EvalSample) -> float:
        if not sample.prediction or not sample.prediction.strip():
            return 0.0
        return float(self._get_scorer().score(sample.reference, sample.prediction)["rougeL"].fmeasure)


@hookimpl
def register_evaluators(register: EvaluatorRegister) -> None:
    register.add_evaluator(Loss())
    register.add_evaluator(ExactMatch())
    register.add_evaluator(FirstWord())
    register.add_evaluator(FirstLine())
    register.add_evaluator(JsonValid())
    register.add_evaluator(PreferenceAccuracy())
    register.add_evaluator(RougeL())
