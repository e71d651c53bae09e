"""The ``preference`` data format: OpenAI's preference (DPO) lines.

    {"input": {"messages": [{"role": "user", "content": "..."}]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

Each line becomes a conversation ending in the preferred answer, with the non-preferred one in
``meta`` (``formats.REJECTED``): the supervised objective could learn the preferred answer from
it, and preference objectives (``dpo``) learn the difference. ``input.tools`` and
``input.parallel_tool_calls``, which OpenAI's format allows, are refused: no tuning method here
trains tool calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapterdeck.core import hookimpl
from adapterdeck.core.formats import (
    PREFERENCES,
    REJECTED,
    Conversation,
    DataFormat,
    Message,
    json_type_name,
    message_problems,
    misplaced_system,
    shown,
)
from adapterdeck.core.plugins import FormatRegister

SIDES = ("preferred_output", "non_preferred_output")
TOP_KEYS = {"input", *SIDES}


class PreferenceFormat(DataFormat):
    name = "preference"
    kind = PREFERENCES
    description = (
        'preference pairs as OpenAI\'s DPO lines: {"input": {"messages": [...]}, '
        '"preferred_output": [{"role": "assistant", "content": "..."}], "non_preferred_output": [...]}'
    )

    def detect(self, record: Mapping[str, Any]) -> bool:
        return any(k in record for k in SIDES)

    def problems(self, record: Mapping[str, Any]) -> list[str]:
        found = [f"unknown key {shown(k)}" for k in sorted(set(record) - TOP_KEYS)]
        found += self._input_problems(record.get("input"))
        answers: list[str | None] = []
        for side in SIDES:
            problems, answer = _side(record.get(side), side)
            found += problems
            answers.append(answer)
        if not found and answers[0] == answers[1]:
            found.append("preferred_output and non_preferred_output are the same answer")
        return found

    def _input_problems(self, value: Any) -> list[str]:
        if value is None:
            return ["missing 'input'"]
        if not isinstance(value, dict):
            return [f"'input' must be an object, got {json_type_name(value)}"]
        found = [f"input: unknown key {shown(k)}" for k in sorted(set(value) - {"messages"})]
        messages = value.get("messages")
        if messages is None:
            return [*found, "input: missing 'messages'"]
        if not isinstance(messages, list):
            return [*found, f"input.messages must be an array, got {json_type_name(messages)}"]
        if not messages:
            return [*found, "input.messages is empty"]
        problems, parsed = message_problems(messages, "input message")
        found += problems
        if not problems:
            if parsed[-1].role != "user":
                found.append(
                    f"the input's last message is from {parsed[-1].role!r}; it must be from the user"
                )
            found += misplaced_system(parsed, "input message")
        return found

    def to_conversation(self, record: Mapping[str, Any]) -> Conversation:
        prompt = tuple(Message(m["role"], m["content"]) for m in record["input"]["messages"])
        preferred = record["preferred_output"][0]["content"]
        rejected = record["non_preferred_output"][0]["content"]
        return Conversation((*prompt, Message("assistant", preferred)), meta={REJECTED: rejected})


def _side(value: Any, side: str) -> tuple[list[str], str | None]:
    """The problems of one answer (``preferred_output`` or ``non_preferred_output``) and its text."""
    if value is None:
        return [f"missing {side!r}"], None
    if not isinstance(value, list):
        return [f"{side!r} must be an array of one assistant message, got {json_type_name(value)}"], None
    if len(value) != 1:
        return [f"{side!r} must hold exactly one assistant message, got {len(value)}"], None
    problems, parsed = message_problems(value, side)
    if not problems and parsed[0].role != "assistant":
        problems.append(f"{side}: the message is from {parsed[0].role!r}; it must be from the assistant")
    return problems, (parsed[0].content if not problems else None)


@hookimpl
def register_formats(register: FormatRegister) -> None:
    register.add_format(PreferenceFormat())
