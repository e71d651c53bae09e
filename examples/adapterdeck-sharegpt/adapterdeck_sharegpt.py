"""An example adapterdeck plugin: the ``sharegpt`` data format and the ``json_fields`` evaluator.

ShareGPT records hold one conversation each::

    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}

``from`` is ``system``, ``human`` or ``gpt`` (``user`` and ``assistant`` are accepted too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from adapterdeck.core import hookimpl
from adapterdeck.core.evaluators import EvalSample, Evaluator
from adapterdeck.core.formats import (
    Conversation,
    DataFormat,
    Message,
    Role,
    conversation_problems,
    json_type_name,
)
from adapterdeck.core.plugins import EvaluatorRegister, FormatRegister

#: ShareGPT speaker names and the adapterdeck role each one becomes.
SPEAKERS: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class ShareGPTFormat(DataFormat):
    name = "sharegpt"
    description = 'one conversation per line: {"conversations": [{"from": "human"|"gpt", "value": "..."}]}'

    def detect(self, record: Mapping[str, Any]) -> bool:
        return "conversations" in record

    def problems(self, record: Mapping[str, Any]) -> list[str]:
        turns = record.get("conversations")
        if turns is None:
            return ["missing 'conversations'"]
        if not isinstance(turns, list):
            return [f"'conversations' must be an array, got {json_type_name(turns)}"]
        if not turns:
            return ["'conversations' is empty"]
        found: list[str] = []
        parsed: list[Message] = []
        for i, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                found.append(f"message {i}: must be an object, got {json_type_name(turn)}")
                continue
            speaker, value = turn.get("from"), turn.get("value")
            if speaker is None:
                found.append(f"message {i}: missing 'from'")
            elif not isinstance(speaker, str):
                found.append(f"message {i}: 'from' must be a string, got {json_type_name(speaker)}")
            elif speaker not in SPEAKERS:
                expected = ", ".join(SPEAKERS)
                found.append(f"message {i}: unknown 'from' value {speaker!r} (expected one of {expected})")
            if value is None:
                found.append(f"message {i}: missing 'value'")
            elif not isinstance(value, str):
                found.append(f"message {i}: 'value' must be a string, got {json_type_name(value)}")
            elif not value.strip():
                found.append(f"message {i}: empty value")
            if isinstance(speaker, str) and speaker in SPEAKERS and isinstance(value, str):
                parsed.append(Message(SPEAKERS[speaker], value))
        if not found:
            found.extend(conversation_problems(parsed))
        return found

    def to_conversation(self, record: Mapping[str, Any]) -> Conversation:
        msgs = tuple(Message(SPEAKERS[t["from"]], t["value"]) for t in record["conversations"])
        return Conversation(msgs, meta={k: v for k, v in record.items() if k != "conversations"})


class JsonFields(Evaluator):
    name = "json_fields"
    description = "share of the reference JSON object's top-level fields the answer has with equal values"
    higher_is_better = True
    needs_generation = True

    def score(self, sample: EvalSample) -> float:
        reference = _json_object(sample.reference)
        prediction = _json_object(sample.prediction)
        if reference is None or prediction is None:
            return 0.0
        if not reference:
            return 1.0 if not prediction else 0.0
        same = sum(
            1 for key, value in reference.items() if key in prediction and _same(value, prediction[key])
        )
        return same / len(reference)


def _json_object(text: str | None) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object, or None when it is not one."""
    if text is None:
        return None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _same(a: Any, b: Any) -> bool:
    """JSON equality: unlike Python's ``==``, ``true`` is not ``1`` (but ``1`` is ``1.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN, Infinity and -Infinity; JSON does not.
    raise ValueError(f"{name} is not JSON")


@hookimpl
def register_formats(register: FormatRegister) -> None:
    register.add_format(ShareGPTFormat())


@hookimpl
def register_evaluators(register: EvaluatorRegister) -> None:
    register.add_evaluator(JsonFields())
