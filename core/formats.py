"""What a data format plugin implements, and the conversation it produces."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# What a format's records are (``DataFormat.kind``), so objectives can say what they train on.
CONVERSATIONS = "conversations"  # one conversation, its last assistant turn the answer to learn
PREFERENCES = "preferences"  # a conversation ending in the preferred answer, the other in ``meta``
#: ``Conversation.meta`` key of a preference example's non-preferred answer (a string).
REJECTED = "non_preferred_output"


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """One training example: messages in order, the last one from the assistant.

    ``line`` is the 1-based line of the source file it came from (0 when built in code).
    """

    messages: tuple[Message, ...]
    line: int = 0
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as ``[{"role": ..., "content": ...}]`` for a chat template."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def prompt(self) -> list[dict[str, str]]:
        """Every message before the final assistant turn."""
        return self.as_dicts()[:-1]

    @property
    def reference(self) -> str:
        """The final assistant turn: what a tuned model should answer."""
        return self.messages[-1].content

    @property
    def rejected(self) -> Conversation | None:
        """For a preference example, the same conversation ending in the non-preferred answer."""
        other = self.meta.get(REJECTED)
        if not isinstance(other, str):
            return None
        messages = (*self.messages[:-1], Message("assistant", other))
        return Conversation(messages, self.line, self.source, self.meta)


class DataFormat(ABC):
    """A JSONL record format. Subclass it and register an instance.

    ``detect`` is lenient (does this record *try* to be in my format?), so that a
    broken record of a known format gets precise reasons from ``problems``
    instead of "unknown format".
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: What its records are: ``CONVERSATIONS``, or ``PREFERENCES`` (each conversation's ``meta``
    #: holds the non-preferred answer under ``REJECTED``); objectives take data by kind.
    kind: ClassVar[str] = CONVERSATIONS

    @abstractmethod
    def detect(self, record: Mapping[str, Any]) -> bool:
        """True when the record is meant to be in this format."""

    @abstractmethod
    def problems(self, record: Mapping[str, Any]) -> list[str]:
        """Every plain reason the record is unusable; empty when it is fine."""

    @abstractmethod
    def to_conversation(self, record: Mapping[str, Any]) -> Conversation:
        """Turn a record without problems into a conversation."""


def conversation_problems(messages: list[Message]) -> list[str]:
    """Problems every conversation must not have, whatever format it came from."""
    found: list[str] = []
    if not any(m.role == "assistant" for m in messages):
        found.append("no assistant turn")
    elif messages[-1].role != "assistant":
        found.append(f"the last turn is from {messages[-1].role!r}; it must be from the assistant")
    found += misplaced_system(messages)
    return found


def misplaced_system(messages: list[Message], label: str = "message") -> list[str]:
    """A system message anywhere but first, each named ``label i``."""
    return [
        f"{label} {i}: a system message may only come first"
        for i, m in enumerate(messages, start=1)
        if m.role == "system" and i != 1
    ]


MESSAGE_KEYS = frozenset({"role", "content", "name"})


def message_problems(messages: list[Any], label: str = "message") -> tuple[list[str], list[Message]]:
    """Every problem of a list of ``{"role", "content"}`` objects (each named ``label i``), and
    the messages that could be read."""
    found: list[str] = []
    parsed: list[Message] = []
    for i, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict):
            found.append(f"{label} {i}: must be an object, got {json_type_name(msg)}")
            continue
        role, content = msg.get("role"), msg.get("content")
        for key in sorted(set(msg) - MESSAGE_KEYS):
            found.append(f"{label} {i}: unknown key {shown(key)}")
        if role is None:
            found.append(f"{label} {i}: missing 'role'")
        elif role not in ROLES:
            found.append(f"{label} {i}: unknown role {shown(role)} (expected system, user or assistant)")
        if content is None:
            found.append(f"{label} {i}: missing 'content'")
        elif not isinstance(content, str):
            found.append(f"{label} {i}: 'content' must be a string, got {json_type_name(content)}")
        elif not content.strip():
            found.append(f"{label} {i}: empty content")
        elif problem := text_problem(content):
            found.append(f"{label} {i}: content {problem}")
        if role in ROLES and isinstance(content, str):
            parsed.append(Message(role, content))
    return found, parsed


def json_type_name(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that quote a record's value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"


def text_problem(text: str) -> str | None:
    """Why a string from a record cannot be training text, or None when it can.

    JSON can spell what is not text: ``\\u0000`` (a NUL character) and an unpaired surrogate such
    as ``\\ud800``, which no tokenizer can encode and no UTF-8 file can hold.
    """
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"contains an unpaired surrogate (\\u{ord(text[exc.start]):04x}), which is not a character"
    return None
