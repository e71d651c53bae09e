"""The hop to vLLM: forward a completion (the tenant's prefix-cache salt and the engine's key
added) and relay its answer, a server-sent-event stream included, as it comes."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi.responses import Response, StreamingResponse

from adapterdeck.core.methods import ENGINE_VLLM
from adapterdeck.serve.engines.process import VllmSupervisor
from adapterdeck.serve.errors import ApiError, unavailable
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.settings import ServeSettings
from adapterdeck.serve.target import Outcome, Target

logger = logging.getLogger("adapterdeck.serve")
VLLM_KEY_ENV = "ADAPTERDECK_VLLM_API_KEY"  # the key of a vLLM at --vllm-url, unless vllm.api_key sets it


class VllmEngine:
    """A vLLM server: one this gateway started (``supervisor``), or the one at ``vllm.url``."""

    def __init__(self, settings: ServeSettings, supervisor: VllmSupervisor | None, metrics: Metrics) -> None:
        self.supervisor = supervisor
        self.metrics = metrics
        self.url = settings.vllm.url.rstrip("/") if settings.vllm.url else supervisor.url  # type: ignore[union-attr]
        # aiohttp for the hop to vLLM: its C parser costs a fraction of httpx's CPU per request.
        self.client: aiohttp.ClientSession | None = None
        self._loaded: set[str] = set()
        self._incarnation: int | None = None
        self._key = settings.vllm.api_key or os.environ.get(VLLM_KEY_ENV) or None
        # Each tenant's prefix-cache salt: a keyed hash of its name, so no client can name another
        # tenant's salt. Gateways sharing an engine (and its key) share the salts, hence the cache.
        self._salt_key = (self._key or "").encode() or secrets.token_bytes(32)

    async def open(self) -> None:
        self.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=600, sock_connect=2),
            connector=aiohttp.TCPConnector(limit=512),
            read_bufsize=2**20,  # SSE lines (a chunk with logprobs) up to 2 MiB
        )
        if self.supervisor is not None:
            await self.supervisor.start()

    async def close(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.client is not None:
            await self.client.close()

    def headers(self) -> dict[str, str]:
        """The headers of every call to vLLM: the engine's API key (the current one for a vLLM
        this gateway started, a new one at every start)."""
        key = self.supervisor.api_key if self.supervisor is not None else self._key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def cache_salt(self, tenant: str) -> str:
        """vLLM's ``cache_salt`` for ``tenant``: prefix-cache blocks are shared within a tenant only."""
        return hmac.new(self._salt_key, tenant.encode(), hashlib.sha256).hexdigest()[:32]

    def ready(self) -> bool:
        return self.supervisor is None or self.supervisor.ready.is_set()

    async def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {"url": self.url}
        if self.supervisor is not None:
            report.update(
                status="ready" if self.supervisor.ready.is_set() else "starting",
                pid=self.supervisor.pid(),
                restarts=self.supervisor.restarts,
            )
            return report
        try:
            assert self.client is not None
            timeout = aiohttp.ClientTimeout(total=2)
            async with self.client.get(f"{self.url}/health", timeout=timeout) as reply:
                ok = reply.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        report["status"] = "ready" if ok else "unreachable"
        return report

    def _first_load(self, target: Target) -> bool:
        """True when this is the first request to the adapter since vLLM (re)started."""
        incarnation = self.supervisor.restarts if self.supervisor else 0
        if incarnation != self._incarnation:
            self._incarnation, self._loaded = incarnation, set()
        if target.is_base or target.name in self._loaded:
            return False
        self._loaded.add(target.name)
        return True

    def _record_load(self, target: Target, seconds: float) -> None:
        self.metrics.adapter_loads.labels(target.name, ENGINE_VLLM).inc()
        self.metrics.adapter_load_latency.labels(ENGINE_VLLM).observe(seconds)

    async def forward(self, path: str, body: dict[str, Any], target: Target, outcome: Outcome) -> Response:
        if not self.ready():
            raise unavailable("The vLLM engine is starting or restarting; retry shortly.")
        assert self.client is not None
        # The tenant's own cache salt, whatever the client sent: no prompt prefix is shared with
        # another tenant's, so the latency of a cache hit tells nothing about other tenants' prompts.
        body = {**body, "model": target.name, "cache_salt": self.cache_salt(target.tenant)}
        first_load = self._first_load(target)
        if body.get("stream"):
            return await self._stream(path, body, target, outcome, first_load)
        started = time.monotonic()
        try:
            async with self.client.post(f"{self.url}{path}", json=body, headers=self.headers()) as upstream:
                content, status = await upstream.read(), upstream.status
        except aiohttp.ClientError:  # refused, or vLLM went away mid-answer
            raise unavailable("The vLLM engine is not reachable; retry shortly.") from None
        self._check_engine_key(status)
        if status != 200:
            if first_load:
                self._loaded.discard(target.name)
            return Response(content, status_code=status, media_type="application/json")
        try:
            outcome.answered(json.loads(content))
        except ValueError:
            pass
        if first_load:
            self._record_load(target, time.monotonic() - started)
        # vLLM's body goes out as it came: it already names the immutable ref.
        return Response(content, media_type="application/json", headers=target.headers)

    async def _stream(
        self, path: str, body: dict[str, Any], target: Target, outcome: Outcome, first_load: bool
    ) -> Response:
        assert self.client is not None
        started = time.monotonic()
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        try:
            upstream = await self.client.post(f"{self.url}{path}", json=body, headers=self.headers())
        except aiohttp.ClientConnectionError:
            raise unavailable("The vLLM engine is not reachable; retry shortly.") from None
        if upstream.status != 200:
            content = await upstream.read()
            upstream.release()
            self._check_engine_key(upstream.status)
            return Response(content, status_code=upstream.status, media_type="application/json")
        outcome.streaming = True
        return StreamingResponse(
            self._relay(upstream, target, wants_usage, started if first_load else None, outcome),
            media_type="text/event-stream",
            headers=target.headers,
        )

    def _check_engine_key(self, status: int) -> None:
        """vLLM answers 401 only when it refuses the gateway's key: the server is misconfigured."""
        if status != 401:
            return
        where = "vllm.api_key (or ADAPTERDECK_VLLM_API_KEY)" if self.supervisor is None else "its key"
        logger.error("the vLLM engine at %s refused the gateway's API key: set %s", self.url, where)
        raise ApiError(
            502, "The inference engine refused this gateway; the server log says why.", "server_error",
            code="engine_unauthorized",
        )  # fmt: skip

    async def _relay(
        self,
        upstream: aiohttp.ClientResponse,
        target: Target,
        wants_usage: bool,
        load_started: float | None,
        outcome: Outcome,
    ) -> AsyncIterator[bytes]:
        """vLLM's stream as it comes; its usage is always asked for (the metrics count it), and
        taken out again for a client that did not ask for it."""
        status = 200
        try:
            async for raw in upstream.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        chunk = None
                    if isinstance(chunk, dict) and outcome.response_id is None:
                        outcome.response_id = chunk.get("id")
                    if isinstance(chunk, dict) and chunk.get("usage"):
                        outcome.usage = chunk["usage"]
                        if not wants_usage and not chunk.get("choices"):
                            continue
                        if not wants_usage:
                            chunk.pop("usage")
                            line = "data: " + json.dumps(chunk)
                yield (line + "\n").encode()
        except BaseException:
            status = 599  # the stream broke off (or the client went away)
            raise
        finally:
            upstream.release()
            if load_started is not None:
                self._record_load(target, time.monotonic() - load_started)
            if outcome.stream_ended is not None:
                outcome.stream_ended(status)
