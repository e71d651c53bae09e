"""The hop to vLLM: forward a completion to the replica the fleet picks (the tenant's
prefix-cache salt and the engine's key added) and relay its answer, a server-sent-event stream
included, as it comes. A replica that cannot be reached before anything went to the client is
taken out and the request goes once to another (``serve/fleet/``)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import aiohttp
from fastapi.responses import Response, StreamingResponse

from adapterdeck.core.methods import ENGINE_VLLM
from adapterdeck.serve.engines.process import VllmSupervisor
from adapterdeck.serve.errors import ApiError, unavailable
from adapterdeck.serve.fleet.replicas import Fleet, Replica
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.settings import ServeSettings
from adapterdeck.serve.target import REPLICA_HEADER, Outcome, Target

logger = logging.getLogger("adapterdeck.serve")
VLLM_KEY_ENV = "ADAPTERDECK_VLLM_API_KEY"  # the key of a vLLM at --vllm-url, unless vllm.api_key sets it
WARM_PROMPT = "Hello"
T = TypeVar("T")


class ReplicaGone(Exception):
    """The replica could not be reached, or broke off, before anything was sent to the client."""


async def until_lost(replica: Replica, call: Awaitable[T]) -> T:
    """``call``'s result; ``ReplicaGone`` when it fails to connect or breaks off (refused, reset),
    or as soon as the fleet takes the replica out (one that hangs, or is dying slowly), so a
    request that is waiting on it goes to another replica at once."""
    task = asyncio.ensure_future(call)
    lost = replica.lost
    try:
        if lost is not None:
            await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.wait((task,))
    except BaseException:  # the client went away
        _abandon(task)
        raise
    if not task.done():
        _abandon(task)
        raise ReplicaGone
    try:
        return task.result()
    except aiohttp.ClientError:
        raise ReplicaGone from None


async def _first_line(lines: AsyncIterator[bytes]) -> bytes | None:
    """The stream's first line (None: it ended at once)."""
    try:
        return await anext(lines)
    except StopAsyncIteration:
        return None


async def _chain(first: bytes | None, lines: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is None:
        return
    yield first
    async for line in lines:
        yield line


def _abandon(task: asyncio.Future[Any]) -> None:
    task.cancel()
    task.add_done_callback(_release)


def _release(task: asyncio.Future[Any]) -> None:
    if (
        not task.cancelled()
        and task.exception() is None
        and isinstance(task.result(), aiohttp.ClientResponse)
    ):
        task.result().release()


class VllmEngine:
    """The vLLM replicas: the ones this gateway started (``supervisors``) and the ones at
    ``vllm.url``/``vllm.urls``, as one ``Fleet``."""

    def __init__(self, settings: ServeSettings, supervisors: list[VllmSupervisor], metrics: Metrics) -> None:
        self.metrics = metrics
        self._key = settings.vllm.api_key or os.environ.get(VLLM_KEY_ENV) or None
        self.fleet = Fleet(settings, supervisors, metrics, key=self._key, warm_with=self.warm_on)
        # Each tenant's prefix-cache salt: a keyed hash of its name, so no client can name another
        # tenant's salt. Gateways sharing an engine (and its key) share the salts, hence the cache.
        self._salt_key = (self._key or "").encode() or secrets.token_bytes(32)

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self.fleet.client is not None
        return self.fleet.client

    async def open(self) -> None:
        await self.fleet.open()

    async def close(self) -> None:
        await self.fleet.close()

    def cache_salt(self, tenant: str) -> str:
        """vLLM's ``cache_salt`` for ``tenant``: prefix-cache blocks are shared within a tenant only."""
        return hmac.new(self._salt_key, tenant.encode(), hashlib.sha256).hexdigest()[:32]

    def ready(self) -> bool:
        return bool(self.fleet.healthy())

    async def health(self) -> dict[str, Any]:
        return self.fleet.report()

    def _record_load(self, replica: Replica, target: Target, seconds: float) -> None:
        self.metrics.adapter_loads.labels(target.name, ENGINE_VLLM).inc()
        self.metrics.adapter_load_latency.labels(ENGINE_VLLM).observe(seconds)
        self.fleet.loaded(replica, seconds)

    async def forward(self, path: str, body: dict[str, Any], target: Target, outcome: Outcome) -> Response:
        # The tenant's own cache salt, whatever the client sent: no prompt prefix is shared with
        # another tenant's, so the latency of a cache hit tells nothing about other tenants' prompts.
        body = {**body, "model": target.name, "cache_salt": self.cache_salt(target.tenant)}
        tried: list[Replica] = []
        while len(tried) < 2:  # the replica the fleet picks, and once another
            replica = self.fleet.choose(target, tried)
            if replica is None:
                break
            if tried:
                self.metrics.replica_retries.labels(tried[-1].id).inc()
            try:
                return await self.send_to(replica, path, body, target, outcome)
            except ReplicaGone:
                tried.append(replica)
                self.fleet.failed(replica)
        if not tried:
            raise unavailable("The vLLM engine is starting or restarting; retry shortly.")
        raise unavailable("The vLLM engine is not reachable; retry shortly.")

    async def warm_on(self, replica: Replica, name: str) -> bool:
        """Load adapter ``name`` on ``replica`` by a one-token completion (``Fleet.warm``)."""
        tenant = name.partition("/")[0]
        target = Target(name, ENGINE_VLLM, tenant)
        body = {"model": name, "prompt": WARM_PROMPT, "max_tokens": 1, "cache_salt": self.cache_salt(tenant)}
        try:
            reply = await self.send_to(replica, "/v1/completions", body, target, Outcome())
        except ReplicaGone:
            self.fleet.failed(replica)
            return False
        except ApiError:
            return False
        return reply.status_code == 200

    async def send_to(
        self, replica: Replica, path: str, body: dict[str, Any], target: Target, outcome: Outcome
    ) -> Response:
        """``body`` to ``replica``; ``ReplicaGone`` when it failed before anything reached the client."""
        first_load = not target.is_base and self.fleet.admit(replica, target.name)
        headers = {**target.headers, REPLICA_HEADER: replica.id}
        self.fleet.begin(replica, target)
        try:
            if body.get("stream"):
                return await self._stream(replica, path, body, target, outcome, headers, first_load)
            return await self._answer(replica, path, body, target, outcome, headers, first_load)
        except BaseException:
            if first_load:
                self.fleet.unadmit(replica, target.name)
            raise
        finally:
            if not outcome.streaming:  # a stream's relay ends it when the stream is over
                self.fleet.end(replica, target)

    async def _answer(
        self,
        replica: Replica,
        path: str,
        body: dict[str, Any],
        target: Target,
        outcome: Outcome,
        headers: dict[str, str],
        first_load: bool,
    ) -> Response:
        started = time.monotonic()
        content, status = await until_lost(replica, self._exchange(replica, path, body))
        self._check_engine_key(status, replica)
        if status != 200:
            if first_load:
                self.fleet.unadmit(replica, target.name)
            replica_header = {REPLICA_HEADER: replica.id}
            return Response(
                content, status_code=status, media_type="application/json", headers=replica_header
            )
        try:
            outcome.answered(json.loads(content))
        except ValueError:
            pass
        if first_load:
            self._record_load(replica, target, time.monotonic() - started)
        # vLLM's body goes out as it came: it already names the immutable ref.
        return Response(content, media_type="application/json", headers=headers)

    async def _stream(
        self,
        replica: Replica,
        path: str,
        body: dict[str, Any],
        target: Target,
        outcome: Outcome,
        headers: dict[str, str],
        first_load: bool,
    ) -> Response:
        started = time.monotonic()
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        post = self.client.post(f"{replica.url}{path}", json=body, headers=replica.headers())
        upstream = await until_lost(replica, post)
        if upstream.status != 200:
            content = await upstream.read()
            upstream.release()
            self._check_engine_key(upstream.status, replica)
            if first_load:
                self.fleet.unadmit(replica, target.name)
            replica_header = {REPLICA_HEADER: replica.id}
            return Response(
                content, status_code=upstream.status, media_type="application/json", headers=replica_header
            )
        # Nothing goes to the client before vLLM's first line: a replica that dies before it
        # leaves the request untouched, so it is retried on another one (``forward``).
        lines = upstream.content.__aiter__()
        try:
            first = await until_lost(replica, _first_line(lines))
        except BaseException:
            upstream.release()
            raise
        relay = self._relay(
            upstream, first, lines, replica, target, wants_usage, started if first_load else None, outcome
        )
        outcome.streaming = True
        return StreamingResponse(relay, media_type="text/event-stream", headers=headers)

    async def _exchange(self, replica: Replica, path: str, body: dict[str, Any]) -> tuple[bytes, int]:
        async with self.client.post(f"{replica.url}{path}", json=body, headers=replica.headers()) as upstream:
            return await upstream.read(), upstream.status

    def _check_engine_key(self, status: int, replica: Replica) -> None:
        """vLLM answers 401 only when it refuses the gateway's key: the server is misconfigured."""
        if status != 401:
            return
        where = "vllm.api_key (or ADAPTERDECK_VLLM_API_KEY)" if replica.supervisor is None else "its key"
        logger.error("the vLLM engine at %s refused the gateway's API key: set %s", replica.url, where)
        raise ApiError(
            502, "The inference engine refused this gateway; the server log says why.", "server_error",
            code="engine_unauthorized",
        )  # fmt: skip

    async def _relay(
        self,
        upstream: aiohttp.ClientResponse,
        first: bytes | None,
        lines: AsyncIterator[bytes],
        replica: Replica,
        target: Target,
        wants_usage: bool,
        load_started: float | None,
        outcome: Outcome,
    ) -> AsyncIterator[bytes]:
        """vLLM's stream as it comes; its usage is always asked for (the metrics count it), and
        taken out again for a client that did not ask for it."""
        status = 200
        try:
            async for raw in _chain(first, lines):
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        chunk = None
                    if isinstance(chunk, dict) and outcome.response_id is None:
                        outcome.response_id = chunk.get("id")
                    if isinstance(chunk, dict):
                        outcome.streamed(chunk)
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
            self.fleet.end(replica, target)
            if load_started is not None:
                self._record_load(replica, target, time.monotonic() - load_started)
            if outcome.stream_ended is not None:
                outcome.stream_ended(status)
