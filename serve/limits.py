"""Per-tenant rate limits and quotas (requests per minute, a moving window, and concurrent
requests), and the bounds on one request (its body's size; a completion's max_tokens, n and
choices).

Limits are kept in each gateway's memory: with several gateways behind a load balancer, each one
enforces the limit on the traffic it sees. A request over a limit is answered with 429 and a
``Retry-After`` header (whole seconds) before any engine sees it.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from adapterdeck.serve.errors import ApiError, bad_request
from adapterdeck.serve.settings import LimitSettings, ServeSettings


def rate_limited(message: str, retry_after: int) -> ApiError:
    error = ApiError(429, message, "rate_limit_exceeded", code="rate_limit_exceeded")
    error.headers = {"Retry-After": str(max(1, retry_after))}
    return error


class Limiter:
    """``check`` counts a request against its tenant's per-minute budget; ``slot`` holds one of
    its concurrent-request slots for as long as the request (or its stream) runs."""

    def __init__(self, defaults: LimitSettings, tenants: dict[str, LimitSettings]) -> None:
        self.defaults, self.tenants = defaults, tenants
        self.window = MovingWindowRateLimiter(MemoryStorage())
        self.in_flight: dict[str, int] = defaultdict(int)

    def settings_for(self, tenant: str) -> LimitSettings:
        return self.tenants.get(tenant, self.defaults)

    async def check(self, tenant: str) -> None:
        rpm = self.settings_for(tenant).requests_per_minute
        if rpm is None:
            return
        item = RateLimitItemPerMinute(rpm)
        if not await self.window.hit(item, tenant):
            stats = await self.window.get_window_stats(item, tenant)
            wait = math.ceil(stats.reset_time - time.time())
            raise rate_limited(
                f"Rate limit reached for {tenant}: {rpm} requests per minute. Retry in {max(1, wait)} s.",
                wait,
            )

    @contextmanager
    def slot(self, tenant: str) -> Iterator[Callable[[], Callable[[], None]]]:
        """Hold a concurrent-request slot; call the yielded ``defer()`` to keep it past the block
        (it returns the function that gives the slot back, for the end of a stream)."""
        cap = self.settings_for(tenant).concurrent_requests
        if cap is not None and self.in_flight[tenant] >= cap:
            raise rate_limited(
                f"Too many concurrent requests for {tenant}: at most {cap} at a time. Retry shortly.", 1
            )
        self.in_flight[tenant] += 1
        state = {"deferred": False, "released": False}

        def release() -> None:
            if not state["released"]:
                state["released"] = True
                self.in_flight[tenant] -= 1

        def defer() -> Callable[[], None]:
            state["deferred"] = True
            return release

        try:
            yield defer
        finally:
            if not state["deferred"]:
                release()


async def then(iterator: AsyncIterator[Any], callback: Callable[[], None]) -> AsyncIterator[Any]:
    """Relay ``iterator``, then call ``callback`` (also when the client goes away mid-stream)."""
    try:
        async for item in iterator:
            yield item
    finally:
        callback()


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


class BodyLimit:
    """ASGI middleware: a request body over the limit gets 413 before it is read into memory.

    Uploads (``POST /v1/files``, ``POST /v1/adapters/{tenant}/{name}/versions``) have their own,
    larger limit."""

    def __init__(self, app: Any, default: int, uploads: int) -> None:
        self.app, self.default, self.uploads = app, default, uploads

    def limit_for(self, path: str) -> int:
        if path == "/v1/files" or (path.startswith("/v1/adapters/") and path.endswith("/versions")):
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
