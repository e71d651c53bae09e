"""The ``chat`` data format: ``{"messages": [{"role": ..., "content": ...}, ...]}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapterdeck.core import hookimpl
from adapterdeck.core.formats import (
    ROLES,
    Conversation,
    DataFormat,
    Message,
    conversation_problems,
    json_type_name,
    shown,
    text_problem,
)
from adapterdeck.core.plugins import FormatRegister

MESSAGE_KEYS = {"role", "content", "name"}


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
        found: list[str] = []
        parsed: list[Message] = []
        for i, msg in enumerate(messages, start=1):
            if not isinstance(msg, dict):
                found.append(f"message {i}: must be an object, got {json_type_name(msg)}")
                continue
            role, content = msg.get("role"), msg.get("content")
            for key in sorted(set(msg) - MESSAGE_KEYS):
                found.append(f"message {i}: unknown key {shown(key)}")
            if role is None:
                found.append(f"message {i}: missing 'role'")
            elif role not in ROLES:
                found.append(f"message {i}: unknown role {shown(role)} (expected system, user or assistant)")
            if content is None:
                found.append(f"message {i}: missing 'content'")
            elif not isinstance(content, str):
                found.append(f"message {i}: 'content' must be a string, got {json_type_name(content)}")
            elif not content.strip():
                found.append(f"message {i}: empty content")
            elif problem := text_problem(content):
                found.append(f"message {i}: content {problem}")
            if role in ROLES and isinstance(content, str):
                parsed.append(Message(role, content))
        if not found:
            found.extend(conversation_problems(parsed))
        return found

    def to_conversation(self, record: Mapping[str, Any]) -> Conversation:
        msgs = tuple(Message(m["role"], m["content"]) for m in record["messages"])
        return Conversation(msgs, meta={k: v for k, v in record.items() if k != "messages"})


@hookimpl
def register_formats(register: FormatRegister) -> None:
    register.add_format(ChatFormat())
