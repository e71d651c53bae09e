"""Dashboard pages: serving (engines and replicas with their loaded adapters, and per adapter the
gateway's own request, error and latency figures) and the playground (one prompt to the base and
to one or two adapters side by side, streamed)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

from adapterdeck.serve.ui.adapters import Signed
from adapterdeck.serve.ui.client import Api, error_message
from adapterdeck.serve.ui.render import HEADERS, page
from adapterdeck.serve.ui.session import checked

router = APIRouter(prefix="/ui", include_in_schema=False)
STARTED = time.time()  # this gateway process's start, for the request rates


def per_model(metrics_text: str) -> list[dict[str, Any]]:
    """Per model (the base or an adapter ref): requests, errors, mean and p95 latency, tokens."""
    rows: dict[str, dict[str, Any]] = {}

    def row(labels: dict[str, str]) -> dict[str, Any]:
        name = labels.get("model") or "?"
        return rows.setdefault(
            name, {"model": name, "requests": 0.0, "errors": 0.0, "seconds": 0.0, "count": 0.0,
                   "buckets": {}, "completion_tokens": 0.0},
        )  # fmt: skip

    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "adapterdeck_requests_total":
                row(s.labels)["requests"] += s.value
            elif s.name == "adapterdeck_request_errors_total":
                row(s.labels)["errors"] += s.value
            elif s.name == "adapterdeck_request_latency_seconds_sum":
                row(s.labels)["seconds"] += s.value
            elif s.name == "adapterdeck_request_latency_seconds_count":
                row(s.labels)["count"] += s.value
            elif s.name == "adapterdeck_request_latency_seconds_bucket":
                buckets = row(s.labels)["buckets"]
                buckets[s.labels["le"]] = buckets.get(s.labels["le"], 0.0) + s.value
            elif s.name == "adapterdeck_completion_tokens_total":
                row(s.labels)["completion_tokens"] += s.value
    uptime = max(1.0, time.time() - STARTED)
    out = []
    for r in sorted(rows.values(), key=lambda r: -r["requests"]):
        out.append({
            "model": r["model"], "requests": int(r["requests"]), "errors": int(r["errors"]),
            "per_minute": round(60 * r["requests"] / uptime, 2),
            "mean_ms": round(1000 * r["seconds"] / r["count"]) if r["count"] else None,
            "p95_ms": _p95(r["buckets"], r["count"]), "completion_tokens": int(r["completion_tokens"]),
        })  # fmt: skip
    return out


def _p95(buckets: dict[str, float], count: float) -> str | None:
    """The histogram bucket the 95th percentile falls in, as its upper bound."""
    if not count:
        return None
    for bound, seen in sorted(buckets.items(), key=lambda kv: float(kv[0])):
        if seen >= 0.95 * count:
            return "over 120 s" if bound == "+Inf" else f"≤ {float(bound) * 1000:g}"
    return None


@router.get("/serving")
async def serving(request: Request, who: Signed) -> Response:
    api = Api(request, who.key)
    metrics = await api.get("/metrics")
    health = await api.report("/health") if who.who.is_admin else None  # 503 while degraded
    return page(request, "serving.html", who, title="Serving", models=per_model(metrics), health=health)


@router.get("/playground")
async def playground(request: Request, who: Signed) -> Response:
    models = await Api(request, who.key).get("/v1/models", limit=1000)
    return page(request, "playground.html", who, title="Playground", models=[m["id"] for m in models["data"]])


class PlayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=300)
    prompt: str = Field(min_length=1, max_length=20_000)
    max_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0, le=2)
    csrf: str = ""


@router.post("/playground/stream")
async def play(request: Request, body: PlayBody) -> Response:
    """One model's answer as server-sent events: ``{"text": ...}`` pieces, then ``{"done": ...}``
    or ``{"error": ...}``; the page adds them as text (never as HTML)."""
    who = await checked(request, body.csrf)
    chat = {
        "model": body.model, "messages": [{"role": "user", "content": body.prompt}], "stream": True,
        "max_tokens": body.max_tokens, "temperature": body.temperature,
    }  # fmt: skip
    api = Api(request, who.key)

    async def events() -> AsyncIterator[bytes]:
        async with api.stream("/v1/chat/completions", chat) as response:
            if response.status_code != 200:
                await response.aread()
                yield _event({"error": error_message(response)})
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for piece in _pieces(line[6:]):
                    yield _event(piece)
        yield _event({"done": True})

    return StreamingResponse(events(), media_type="text/event-stream", headers=HEADERS)


def _pieces(data: str) -> list[dict[str, Any]]:
    try:
        chunk = json.loads(data)
    except ValueError:
        return []
    if "error" in chunk:
        return [{"error": str((chunk["error"] or {}).get("message", chunk["error"]))}]
    out = []
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content")
        if text:
            out.append({"text": text})
    return out


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()
