"""The request bodies of the OpenAI-compatible endpoints, for the gateway's OpenAPI document.

The gateway reads these bodies itself (checking only what it must: ``model``, ``messages`` /
``prompt``, and the bounds on ``max_tokens``, ``n`` and ``stream``) and hands the rest to the engine
as it came, so fields this schema does not list still work. The schema lets clients and API
fuzzers know the shape.
"""

from __future__ import annotations

from typing import Any

_TEXT_OR_LIST = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

_SAMPLING: dict[str, Any] = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "stop": _TEXT_OR_LIST,
    "seed": {"type": "integer"},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "user": {"type": "string", "description": "the end user; A/B experiments assign by it"},
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {"type": "string"},
    },
}

CHAT_COMPLETION = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {
            "type": "string",
            "description": "the base, tenant/name, tenant/name@N, tenant/name:alias or an ft: name",
        },
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        **_SAMPLING,
    },
}

COMPLETION = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {"model": CHAT_COMPLETION["properties"]["model"], "prompt": _TEXT_OR_LIST, **_SAMPLING},
}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads a JSON body of this schema."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
