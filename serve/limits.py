"""Per-tenant rate limits and quotas (requests per minute, a moving window, and concurrent
requests), and the bounds on one request (its body's size; a completion's max_tokens, n and
choices).

Limits are counted where ``limits_storage.url`` says. ``memory://`` (the default): in each
gateway's memory, so with several gateways behind a load balancer each one enforces the limit on
the traffic it sees. ``redis://HOST:PORT/DB``: in Redis (``serve/sharedlimits.py``), so every
gateway that names the same Redis enforces one budget per tenant together. Each gateway also keeps
its own count, the one it falls back on while Redis cannot be reached (``on_outage: local``;
``refuse`` answers 503 instead). A request over a limit is answered with 429 and a
``Retry-After`` header (whole seconds) before any engine sees it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from adapterdeck.serve.errors import ApiError, bad_request
from adapterdeck.serve.settings import LimitSettings, LimitStorage, ServeSettings
from adapterdeck.serve.sharedlimits import RedisCounts, Unreachable

Release = Callable[[], Awaitable[None]]


def rate_limited(message: str, retry_after: int) -> ApiError:
    error = ApiError(429, message, "rate_limit_exceeded", code="rate_limit_exceeded")
    error.headers = {"Retry-After": str(max(1, retry_after))}
    return error


def limits_unavailable() -> ApiError:
    error = ApiError(
        503,
        "The rate limits cannot be checked right now (their store does not answer). Retry shortly.",
        "service_unavailable",
        code="limits_unavailable",
    )
    error.headers = {"Retry-After": "1"}
    return error


class Limiter:
    """``check`` counts a request against its tenant's per-minute budget; ``slot`` holds one of
    its concurrent-request slots for as long as the request (or its stream) runs.

    ``in_flight`` is the slots this gateway holds, per tenant (all of them, taken in Redis or
    not): the count it enforces alone while Redis is away."""

    def __init__(
        self, defaults: LimitSettings, tenants: dict[str, LimitSettings], storage: LimitStorage | None = None
    ) -> None:
        self.defaults, self.tenants = defaults, tenants
        self.storage = storage or LimitStorage()
        self.window = MovingWindowRateLimiter(MemoryStorage())
        self.in_flight: dict[str, int] = defaultdict(int)
        self.shared = None if self.storage.url == "memory://" else RedisCounts(self.storage)

    def settings_for(self, tenant: str) -> LimitSettings:
        return self.tenants.get(tenant, self.defaults)

    def _alone(self) -> None:
        """Redis is away: count locally, or refuse (``on_outage: refuse``)."""
        if self.storage.on_outage == "refuse":
            raise limits_unavailable()

    async def _local_hit(self, item: RateLimitItem, tenant: str) -> float:
        if await self.window.hit(item, tenant):
            return 0.0
        return (await self.window.get_window_stats(item, tenant)).reset_time

    async def check(self, tenant: str) -> None:
        rpm = self.settings_for(tenant).requests_per_minute
        if rpm is None:
            return
        item = RateLimitItemPerMinute(rpm)
        if self.shared is None:
            refused_until = await self._local_hit(item, tenant)
        else:
            try:
                refused_until = await self.shared.hit(item, tenant)
            except Unreachable:
                self._alone()
                refused_until = await self._local_hit(item, tenant)
            else:
                if not refused_until:  # this gateway's own count, kept for an outage
                    await self.window.hit(item, tenant)
        if refused_until:
            wait = max(1, math.ceil(refused_until - time.time()))
            raise rate_limited(
                f"Rate limit reached for {tenant}: {rpm} requests per minute. Retry in {wait} s.", wait
            )

    async def take(self, tenant: str) -> Release:
        """Take one of ``tenant``'s slots (429 when none is free); returns the function that gives
        it back (once, however often it is called). This gateway's count drops at once; Redis is
        told within ``timeout``, else the lease expires on its own."""
        cap = self.settings_for(tenant).concurrent_requests
        lease = None
        if cap is not None:
            alone = self.shared is None
            if self.shared is not None:
                try:
                    lease = await self.shared.acquire(tenant, cap)
                except Unreachable:
                    self._alone()
                    alone = True
                else:
                    if lease is None:
                        raise _too_many(tenant, cap)
            if alone and self.in_flight[tenant] >= cap:
                raise _too_many(tenant, cap)
        self.in_flight[tenant] += 1
        released = False

        async def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.in_flight[tenant] -= 1
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]
            if lease is not None and self.shared is not None:
                told = self.shared.release(tenant, lease)
                if told is not None:  # shielded: a cancelled request still gives its lease back
                    await asyncio.shield(told)

        return release

    @asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[Callable[[], Release]]:
        """Hold a concurrent-request slot; call the yielded ``defer()`` to keep it past the block
        (it returns the function that gives the slot back, for the end of a stream)."""
        release = await self.take(tenant)
        deferred = False

        def defer() -> Release:
            nonlocal deferred
            deferred = True
            return release

        try:
            yield defer
        finally:
            if not deferred:
                await release()

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()


def _too_many(tenant: str, cap: int) -> ApiError:
    return rate_limited(
        f"Too many concurrent requests for {tenant}: at most {cap} at a time. Retry shortly.", 1
    )


async def then(iterator: AsyncIterator[Any], callback: Release) -> AsyncIterator[Any]:
    """Relay ``iterator``, then await ``callback()`` (also when the client goes away mid-stream)."""
    try:
        async for item in iterator:
            yield item
    finally:
        await callback()


def check_request(body: dict[str, Any], field: str, settings: ServeSettings) -> None:
    """Refuse a completion without its ``field`` (``messages`` or ``prompt``), or one that would tie
    an engine up: a huge max_tokens or n, a non-boolean stream, too many choices."""
    if field not in body:
        raise bad_request(f"'{field}' is required.", field)
    _check_bounds(body, settings)
    if field == "prompt":
        _check_choices(body, settings)


def _check_bounds(body: dict[str, Any], settings: ServeSettings) -> None:
    limit = settings.max_tokens or settings.vllm.max_model_len
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad_request(f"'{name}' must be a positive integer.", name)
        if limit is not None and value > limit:
            raise bad_request(f"'{name}' is {value}; this server allows at most {limit}.", name)
    if settings.max_tokens and not (body.get("max_tokens") or body.get("max_completion_tokens")):
        body["max_tokens"] = settings.max_tokens  # the server's limit bounds an open request too
    n, max_n = body.get("n"), settings.max_n
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n):
        raise bad_request(f"'n' must be an integer from 1 to {max_n}.", "n")
    if not isinstance(body.get("stream", False), bool):
        raise bad_request("'stream' must be true or false.", "stream")


def _check_choices(body: dict[str, Any], settings: ServeSettings) -> None:
    """A completion asks for prompts x n choices: at most ``max_choices``."""
    prompt, n = body.get("prompt"), body.get("n") or 1
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        prompts = len(prompt)  # a list of prompts (texts or token lists); else one prompt
    else:
        prompts = 1
    limit = settings.max_choices
    if prompts * n > limit:
        raise bad_request(
            f"{prompts} prompts x n={n} asks for {prompts * n} choices; this server allows at most "
            f"{limit} a request (max_choices).",
            "prompt",
        )


class _TooLarge(Exception):
    pass


UI_UPLOAD = "/ui/jobs"  # the dashboard's form that uploads a training file and starts a job


class BodyLimit:
    """ASGI middleware: a request body over the limit gets 413 before it is read into memory.

    Uploads (``POST /v1/files``, ``POST /v1/adapters/{tenant}/{name}/versions`` and the
    dashboard's ``POST /ui/jobs``, a training file and a job in one form) have their own, larger
    limit."""

    def __init__(self, app: Any, default: int, uploads: int) -> None:
        self.app, self.default, self.uploads = app, default, uploads

    def limit_for(self, path: str) -> int:
        if path in ("/v1/files", UI_UPLOAD) or (
            path.startswith("/v1/adapters/") and path.endswith("/versions")
        ):
            return self.uploads
        return self.default

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        received, started = 0, False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send: Any, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"The request body is larger than this server accepts ({limit:,} bytes).",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
