"""An example adapterdeck plugin: the ``sharegpt`` data format and the ``json_valid`` evaluator.

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


class JsonValid(Evaluator):
    name = "json_valid"
    description = "1.0 when the model's answer parses as a JSON value, else 0.0 (the mean is the valid share)"
    higher_is_better = True
    needs_generation = True

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


@hookimpl
def register_formats(register: FormatRegister) -> None:
    register.add_format(ShareGPTFormat())


@hookimpl
def register_evaluators(register: EvaluatorRegister) -> None:
    register.add_evaluator(JsonValid())
