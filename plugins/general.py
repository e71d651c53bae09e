"""The built-in ``general`` evaluator: a shipped probe set of general capability.

Tuning an adapter on one task can cost the base model what it could do before (catastrophic
forgetting). This evaluator scores a model on ``core/data/general_probes.jsonl`` instead of the
run's test split: 100 short probes, 25 each of common facts, single-step arithmetic, format
following and harmless everyday requests. Each probe carries a ``check``, a dict of conditions an
answer must all meet (see ``check_answer``); base against tuned shows what tuning forgot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

from adapterdeck.core import hookimpl
from adapterdeck.core.evaluators import EvalSample, Evaluator
from adapterdeck.core.formats import Conversation, Message
from adapterdeck.core.plugins import EvaluatorRegister

PROBES_RESOURCE = "data/general_probes.jsonl"

#: Phrases that mark an answer as a refusal (matched case-insensitively, as whole words).
REFUSAL_PHRASES: tuple[str, ...] = (
    "I can't",
    "I cannot",
    "I can not",
    "I'm sorry",
    "I am sorry",
    "as an AI",
    "I am unable",
    "I'm unable",
    "I won't",
    "I will not",
    "I'm not able to",
    "I am not able to",
    "I apologize",
    "I must decline",
)

_QUOTES = "\"'`“”‘’"
_FLAGS = re.IGNORECASE | re.DOTALL


def _normalize(text: str) -> str:
    # Curly apostrophes count as straight ones, so "I’m sorry" is "I'm sorry".
    return text.replace("’", "'").replace("‘", "'")


def _occurs(item: str, text: str) -> bool:
    """True when ``item`` occurs in ``text`` as a whole word or number (case-insensitively).

    A number inside a longer one does not count: "12" is not in "120", "3.12" or "1,12".
    """
    pattern = r"(?<!\w)(?<!\d[.,])" + re.escape(_normalize(item)) + r"(?!\w)(?![.,]\d)"
    return re.search(pattern, _normalize(text), re.IGNORECASE) is not None


def _first_json_object(text: str) -> dict[str, Any] | None:
    """The answer as a JSON object, or else the first ``{...}`` object in it; None if there is none."""
    try:
        whole = json.loads(text.strip())
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, dict):
        return whole
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _as_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"check condition {name!r} needs a non-empty list of strings, got {value!r}")
    return [str(v) for v in value]


def _contains_any(answer: str, value: Any) -> bool:
    return any(_occurs(item, answer) for item in _as_list("contains_any", value))


def _contains_all(answer: str, value: Any) -> bool:
    return all(_occurs(item, answer) for item in _as_list("contains_all", value))


def _regex(answer: str, value: Any) -> bool:
    return re.search(str(value), answer, _FLAGS) is not None


def _max_words(answer: str, value: Any) -> bool:
    return len(answer.split()) <= int(value)


def _starts_with(answer: str, value: Any) -> bool:
    stripped = _normalize(answer).strip().strip(_QUOTES).strip()
    return stripped.lower().startswith(_normalize(str(value)).lower())


def _uppercase(answer: str, value: Any) -> bool:
    if not value:
        return True
    letters = [c for c in answer if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters)


def _json_keys(answer: str, value: Any) -> bool:
    obj = _first_json_object(answer)
    return obj is not None and all(key in obj for key in _as_list("json_keys", value))


def _no_refusal(answer: str, value: Any) -> bool:
    if not value:
        return True
    text = _normalize(answer)
    if not text.strip():
        return False
    return not any(
        re.search(r"(?<!\w)" + re.escape(_normalize(p)) + r"(?!\w)", text, re.IGNORECASE)
        for p in REFUSAL_PHRASES
    )


CONDITIONS: dict[str, Callable[[str, Any], bool]] = {
    "contains_any": _contains_any,
    "contains_all": _contains_all,
    "regex": _regex,
    "max_words": _max_words,
    "starts_with": _starts_with,
    "uppercase": _uppercase,
    "json_keys": _json_keys,
    "no_refusal": _no_refusal,
}


def check_answer(answer: str, check: Mapping[str, Any]) -> bool:
    """True when ``answer`` meets every condition in ``check``.

    Conditions (case-insensitive unless said): ``contains_any`` / ``contains_all`` (a list of
    strings, each matched as a whole word or number), ``regex`` (``re.search``, IGNORECASE and
    DOTALL), ``max_words`` (at most this many whitespace-separated words), ``starts_with`` (after
    stripping whitespace and quotes), ``uppercase`` (it has letters and all are uppercase),
    ``json_keys`` (the answer, or the first ``{...}`` object in it, is a JSON object with these
    keys) and ``no_refusal`` (non-empty, and no phrase of ``REFUSAL_PHRASES``). An unknown
    condition raises ``ValueError``.
    """
    unknown = sorted(set(check) - set(CONDITIONS))
    if unknown:
        raise ValueError(
            f"unknown check condition(s) {', '.join(map(repr, unknown))}; known: {', '.join(CONDITIONS)}"
        )
    return all(CONDITIONS[name](answer, value) for name, value in check.items())


def load_probes() -> list[Conversation]:
    """The shipped probes as conversations ending with the expected answer; ``meta`` has the check."""
    text = resources.files("adapterdeck.core").joinpath(PROBES_RESOURCE).read_text(encoding="utf-8")
    probes: list[Conversation] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        messages = tuple(Message(m["role"], m["content"]) for m in record["messages"])
        messages += (Message("assistant", record["answer"]),)
        meta = {"id": record["id"], "category": record["category"], "check": record["check"]}
        probes.append(Conversation(messages, line=number, source=PROBES_RESOURCE, meta=meta))
    return probes


class General(Evaluator):
    name = "general"
    description = (
        "share of a shipped general-capability probe set (facts, arithmetic, format following, "
        "harmless help) answered right; base vs tuned shows what tuning forgot"
    )
    higher_is_better = True
    needs_generation = True
    needs_loss = False
    max_new_tokens = 48

    def __init__(self) -> None:
        self._probes: tuple[Conversation, ...] | None = None

    def examples(self) -> Sequence[Conversation]:
        # Read on first use: plugin modules load on every command.
        if self._probes is None:
            self._probes = tuple(load_probes())
        return self._probes

    def score(self, sample: EvalSample) -> float:
        check = sample.meta.get("check")
        if not isinstance(check, Mapping):
            raise ValueError(
                "the 'general' evaluator scores its own probes: the sample's meta has no 'check' "
                "(was it scored on examples other than General.examples()?)"
            )
        if sample.prediction is None:
            return 0.0
        return 1.0 if check_answer(sample.prediction, check) else 0.0


@hookimpl
def register_evaluators(register: EvaluatorRegister) -> None:
    register.add_evaluator(General())
