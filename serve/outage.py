"""What the gateway does while the registry database cannot be reached.

``DatabaseStatus`` is the one record of whether the database answers (``/health`` reports it;
every lookup, the experiments' refresh and the health check update it). Lookups go through
``fetch``: while the database is away, the last answer a ``Remembered`` holds for the same name
is used, so keys and adapters the gateway has already seen keep working through an outage (the
most recently used ones, up to each ``Remembered``'s bound).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from adapterdeck.registry import Registry
from adapterdeck.registry.cache import Lru
from adapterdeck.serve.errors import unavailable

logger = logging.getLogger("adapterdeck.serve")
PING_TIMEOUT = 5


class Remembered:
    """The last answer for each name, for the ``limit`` names used most recently."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.answers: Lru[str, Any] = Lru(limit)

    def keep(self, name: str, answer: Any) -> None:
        if answer is None:  # e.g. a revoked key: it must not come back during an outage
            self.answers.pop(name, None)
            return
        self.answers[name] = answer


class DatabaseStatus:
    def __init__(self) -> None:
        self.ok = True

    def failed(self, exc: BaseException) -> None:
        if self.ok:
            logger.warning("the registry database cannot be reached: %s", type(exc).__name__)
        self.ok = False

    def answered(self) -> None:
        self.ok = True

    async def fetch(self, call: Callable[[], Any], name: str, memory: Remembered) -> Any:
        """``call()`` in a worker thread, its answer remembered under ``name``; while the database
        cannot be reached, the answer remembered (503 when there is none)."""
        try:
            answer = await asyncio.to_thread(call)
        except SQLAlchemyError as exc:
            self.failed(exc)
            if name in memory.answers:
                return memory.answers[name]
            raise unavailable("The registry database cannot be reached; retry shortly.") from None
        self.answered()
        memory.keep(name, answer)
        return answer

    async def check(self, registry: Registry) -> bool:
        """Ping the database (at most ``PING_TIMEOUT`` seconds); True when it answers."""
        try:
            await asyncio.wait_for(asyncio.to_thread(registry.ping), timeout=PING_TIMEOUT)
        except (SQLAlchemyError, TimeoutError) as exc:
            self.failed(exc)
        else:
            self.answered()
        return self.ok
