"""The ``alpaca`` data format: ``instruction``, optional ``input``, ``output``, optional ``system``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapterdeck.core import hookimpl
from adapterdeck.core.formats import Conversation, DataFormat, Message, json_type_name, text_problem
from adapterdeck.core.plugins import FormatRegister

REQUIRED = ("instruction", "output")
OPTIONAL = ("input", "system")


class AlpacaFormat(DataFormat):
    name = "alpaca"
    description = (
        'one example per line: {"instruction": "...", "input": "...", "output": "..."} '
        "(input and system optional)"
    )

    def detect(self, record: Mapping[str, Any]) -> bool:
        return "messages" not in record and ("instruction" in record or "output" in record)

    def problems(self, record: Mapping[str, Any]) -> list[str]:
        found: list[str] = []
        for key in REQUIRED:
            value = record.get(key)
            if value is None:
                found.append(f"missing {key!r}")
            elif not isinstance(value, str):
                found.append(f"{key!r} must be a string, got {json_type_name(value)}")
            elif not value.strip():
                found.append(f"empty {key!r}")
            elif problem := text_problem(value):
                found.append(f"{key!r} {problem}")
        for key in OPTIONAL:
            value = record.get(key)
            if value is not None and not isinstance(value, str):
                found.append(f"{key!r} must be a string, got {json_type_name(value)}")
            elif value is not None and (problem := text_problem(value)):
                found.append(f"{key!r} {problem}")
        return found

    def to_conversation(self, record: Mapping[str, Any]) -> Conversation:
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        msgs = [Message("user", prompt), Message("assistant", record["output"])]
        if record.get("system"):
            msgs.insert(0, Message("system", record["system"]))
        meta = {k: v for k, v in record.items() if k not in REQUIRED + OPTIONAL}
        return Conversation(tuple(msgs), meta=meta)


@hookimpl
def register_formats(register: FormatRegister) -> None:
    register.add_format(AlpacaFormat())
