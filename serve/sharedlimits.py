"""The limits' counts in Redis, shared by every gateway that names the same Redis
(``limits_storage.url: redis://HOST:PORT/DB``).

The per-minute windows are the ``limits`` library's moving windows in its Redis storage. A
tenant's concurrency slots are a sorted set of leases (member: the lease's id, score: when it
expires, in Redis's own clock so gateways' clocks need not agree), taken and renewed by Lua
scripts so a check and its take are one step. The gateway renews the leases it holds every
``lease_seconds / 3``; a gateway that dies stops renewing, and its slots are free again after
``lease_seconds``.

No call waits longer than ``timeout`` and none is retried: a call that fails raises
``Unreachable``, after which no call is tried for ``RETRY_SECONDS`` (the caller counts on its
own meanwhile). An unreachable Redis costs a request at most one timeout, most of them nothing,
and is logged once when it goes and once when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from limits import RateLimitItem
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from adapterdeck.serve.settings import LimitStorage

logger = logging.getLogger("adapterdeck.serve")
T = TypeVar("T")
RETRY_SECONDS = 1.0
RENEWALS_PER_LEASE = 3

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"""

# KEYS[1] the tenant's leases; ARGV: the cap, the new lease's id, the lease in milliseconds.
ACQUIRE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: tenants' leases; ARGV: the lease in milliseconds, then for each key its number of leases
# and their ids. XX: a lease given back (or expired) meanwhile is not brought back.
RENEW = (
    _NOW_MS
    + """
local lease = tonumber(ARGV[1])
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for j = 1, n do
    redis.call('ZADD', KEYS[k], 'XX', now + lease, ARGV[i])
    i = i + 1
  end
  redis.call('PEXPIRE', KEYS[k], lease)
end
return 0
"""
)


class Unreachable(Exception):
    """Redis did not answer in time (or is known to be away): the caller counts on its own."""


def shown_url(url: str) -> str:
    """``url`` without its password, for the log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisCounts:
    """Every gateway's per-minute windows and concurrency leases, in one Redis."""

    def __init__(self, settings: LimitStorage) -> None:
        self.settings = settings
        timeout = settings.timeout
        self.client = Redis.from_url(
            settings.url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        scheme = "async+redis+" if settings.url.startswith("unix://") else "async+"
        storage = RedisStorage(
            scheme + settings.url,
            implementation="redispy",
            key_prefix=f"{settings.key_prefix}:window",
            wrap_exceptions=True,
            connection_pool=self.client.connection_pool,
        )
        self.window = MovingWindowRateLimiter(storage)
        self.acquire_script = self.client.register_script(ACQUIRE)
        self.renew_script = self.client.register_script(RENEW)
        self.held: dict[str, set[str]] = {}  # tenant -> the leases this gateway holds
        self.down_until = 0.0
        self.down = False
        self.renewer: asyncio.Task[None] | None = None
        self.pending: set[asyncio.Task[Any]] = set()

    def key(self, tenant: str) -> str:
        return f"{self.settings.key_prefix}:slots:{tenant}"

    @property
    def lease_ms(self) -> int:
        return max(1, round(self.settings.lease_seconds * 1000))

    async def call(self, what: Callable[[], Awaitable[T]]) -> T:
        """``what()``'s answer within ``timeout``; ``Unreachable`` otherwise, and for
        ``RETRY_SECONDS`` after."""
        if self.down and time.monotonic() < self.down_until:
            raise Unreachable
        try:
            async with asyncio.timeout(self.settings.timeout):
                answer = await what()
        except (RedisError, StorageError, OSError, TimeoutError) as exc:
            self.down_until = time.monotonic() + RETRY_SECONDS
            if not self.down:
                self.down = True
                logger.warning(
                    "limits: Redis at %s cannot be reached (%s: %s); limits_storage.on_outage is %s "
                    "until it answers again",
                    shown_url(self.settings.url),
                    type(exc).__name__,
                    exc,
                    self.settings.on_outage,
                )
            raise Unreachable from exc
        if self.down:
            self.down = False
            logger.warning(
                "limits: Redis at %s answers again; limits are shared", shown_url(self.settings.url)
            )
        return answer

    async def hit(self, item: RateLimitItem, tenant: str) -> float:
        """Count a request in ``tenant``'s window: 0 if it fits, else when (epoch seconds) the
        window has room again."""

        async def hit() -> float:
            if await self.window.hit(item, tenant):
                return 0.0
            return (await self.window.get_window_stats(item, tenant)).reset_time

        return await self.call(hit)

    async def acquire(self, tenant: str, cap: int) -> str | None:
        """A new lease on one of ``tenant``'s ``cap`` slots, or None when all are taken."""
        lease = uuid.uuid4().hex
        args = [cap, lease, self.lease_ms]
        taken = await self.call(lambda: self.acquire_script(keys=[self.key(tenant)], args=args))
        if not taken:
            return None
        self.held.setdefault(tenant, set()).add(lease)
        if self.renewer is None or self.renewer.done():
            self.renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return lease

    def release(self, tenant: str, lease: str) -> asyncio.Task[None] | None:
        """Stop renewing ``lease`` and give it back, in a task that outlives a cancelled caller
        (returned, to be awaited); if Redis cannot be told, the lease expires on its own."""
        leases = self.held.get(tenant, set())
        leases.discard(lease)
        if not leases:
            self.held.pop(tenant, None)
        try:
            task = asyncio.get_running_loop().create_task(self._forget(tenant, lease))
        except RuntimeError:  # no loop any more: the lease expires
            return None
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    async def _forget(self, tenant: str, lease: str) -> None:
        try:
            await self.call(lambda: self.client.zrem(self.key(tenant), lease))
        except Unreachable:
            pass

    async def renew(self) -> None:
        """Extend every lease this gateway holds by ``lease_seconds`` from now."""
        held = {tenant: sorted(leases) for tenant, leases in self.held.items() if leases}
        if not held:
            return
        args: list[Any] = [self.lease_ms]
        for leases in held.values():
            args += [len(leases), *leases]
        keys = [self.key(tenant) for tenant in held]
        await self.call(lambda: self.renew_script(keys=keys, args=args))

    async def _renew_forever(self) -> None:
        while self.held:
            await asyncio.sleep(self.settings.lease_seconds / RENEWALS_PER_LEASE)
            try:
                await self.renew()
            except Unreachable:
                pass

    async def close(self) -> None:
        """Stop renewing, give back what this gateway holds, close the connections."""
        if self.renewer is not None:
            self.renewer.cancel()
        for tenant, leases in list(self.held.items()):
            for lease in list(leases):
                self.release(tenant, lease)
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=self.settings.timeout * 2)
        await self.client.aclose()
