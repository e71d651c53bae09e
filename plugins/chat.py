"""The ``chat`` data format: ``{"messages": [{"role": ..., "content": ...}, ...]}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapterdeck.core import hookimpl
from adapterdeck.core.formats import (
    Conversation,
    DataFormat,
    Message,
    conversation_problems,
    json_type_name,
    message_problems,
)
from adapterdeck.core.plugins import FormatRegister


class ChatFormat(DataFormat):
    name = "chat"
    description = (
        'one conversation per line: {"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}'
    )

    def detect(self, record: Mapping[str, Any]) -> bool:
        return "messages" in record

    def problems(self, record: Mapping[str, Any]) -> list[str]:
        messages = record.get("messages")
        if messages is None:
            return ["missing 'messages'"]
        if not isinstance(messages, list):
            return [f"'messages' must be an array, got {json_type_name(messages)}"]
        if not messages:
            return ["'messages' is empty"]
        found, parsed = message_problems(messages)
        if not found:
            found.extend(conversation_problems(parsed))
        return found

    def to_conversation(self, record: Mapping[str, Any]) -> Conversation:
        msgs = tuple(Message(m["role"], m["content"]) for m in record["messages"])
        return Conversation(msgs, meta={k: v for k, v in record.items() if k != "messages"})


@hookimpl
def register_formats(register: FormatRegister) -> None:
    register.add_format(ChatFormat())
