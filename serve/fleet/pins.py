"""The pin warmer: every pinned alias's current version stays loaded on its replicas, so no request
to it waits for vLLM to load an adapter.

``PinWarmer`` asks the fleet to make each pin's version (``Pins.resolved()``: the immutable ref
its alias points at now) resident on the pin's replicas (``Fleet.warm``: a one-token completion
through the normal path on each replica that does not hold it yet, nothing on the others). A
pass does that for every pin: when the gateway starts, when a replica becomes ready (after a
start, a restart, or coming back: it holds nothing), every ``fleet.pin_refresh_seconds`` (which
finds an alias moved anywhere, the CLI or another gateway, and loads again a pin the replica's
cache evicted), and at once after a pin changes through this gateway's API. An alias moved
through this gateway's API is loaded *before* it moves (``before_move``), so its first request
finds the new version loaded. All of it runs in one background task: a user request never waits
for it, and a load that fails is logged and tried again at the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.methods import ENGINE_VLLM
from adapterdeck.registry import Registry
from adapterdeck.registry.fleet import Pin, Pins
from adapterdeck.registry.refs import Ref, parse_adapter
from adapterdeck.serve.settings import ServeSettings

logger = logging.getLogger("adapterdeck.serve.fleet")

WARMS_AT_ONCE = 4  # one-token completions in flight for warming; the rest of vLLM serves users
BEFORE_MOVE_TIMEOUT = 60.0  # an alias move waits this long for its new version to load, then moves


class WarmingFleet(Protocol):
    """What the warmer needs of the fleet (``serve/fleet/replicas.py``'s ``Fleet``)."""

    async def warm(self, name: str, k: int | None = None) -> list[str]: ...

    def on_replica_ready(self, callback: Callable[[Any], Any]) -> None: ...


class PinWarmer:
    """Keeps the pinned aliases' versions loaded on the fleet; ``start`` and ``close`` it with the
    gateway, ``nudge`` it after a change, ``status`` says what it has loaded where."""

    def __init__(self, fleet: WarmingFleet, registry: Registry, settings: ServeSettings) -> None:
        self.fleet = fleet
        self.registry = registry
        self.pins = Pins(registry)
        self.interval = settings.fleet.pin_refresh_seconds
        self.current: dict[str, Pin] = {}  # every pin as last read, by its name (tenant/name:alias)
        # What each pin was last loaded as, (ref, replicas asked for), and the replicas it is on.
        self._warmed: dict[str, tuple[str, int | None]] = {}
        self._where: dict[str, list[str]] = {}
        self._failed: dict[str, str] = {}  # the last failure of each pin, logged once
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(WARMS_AT_ONCE)
        self.passes = 0

    async def start(self) -> None:
        self.fleet.on_replica_ready(self.replica_ready)
        self._task = asyncio.create_task(self._run(), name="adapterdeck-pin-warmer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def nudge(self) -> None:
        """Look at the pins again now (after a pin or alias change through this gateway)."""
        self._wake.set()

    def replica_ready(self, replica: Any) -> None:
        """A replica became ready (``Fleet.on_replica_ready``): a fresh vLLM holds no adapter, so
        a pass runs now, loading every pin whose replicas include the new one."""
        logger.info(
            "vLLM replica %s is ready: loading the pinned adapters there", getattr(replica, "id", replica)
        )
        self.nudge()

    def status(self, pin: str) -> dict[str, Any]:
        """What this gateway has loaded for ``pin``: the ref and the replicas it is on."""
        ref = self._warmed.get(pin, (None, None))[0]
        return {"warm": ref, "warm_on": list(self._where.get(pin, [])) if ref else []}

    # -- the passes ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # a bug must not end the warming for the gateway's lifetime
                logger.exception("pin warming pass failed; trying again at the next one")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def refresh(self) -> None:
        """One pass: read every pin and make each one's version resident on its replicas."""
        try:
            pins = await asyncio.to_thread(self.pins.resolved)
        except Exception as exc:  # the database is down: keep what is loaded, look again later
            logger.warning("cannot read the pins (%s); trying again in %.3g s", exc, self.interval)
            return
        self.current = {p.pin: p for p in pins}
        for gone in set(self._warmed) - set(self.current):
            self._warmed.pop(gone, None)
            self._where.pop(gone, None)
        await asyncio.gather(*(self._warm(p.pin, p.ref, p.replicas) for p in pins if self._servable(p)))
        self.passes += 1

    def _servable(self, pin: Pin) -> bool:
        if pin.ref is None:
            return False
        if ENGINE_VLLM not in pin.served_by:  # the embedded PEFT engine has no replicas to warm
            self._log_failure(pin.pin, f"{pin.ref} is not served by vLLM; nothing to keep loaded")
            return False
        return True

    async def _warm(self, pin: str, ref: str | None, replicas: int | None) -> bool:
        assert ref is not None
        async with self._slots:
            try:
                where = await self.fleet.warm(ref, replicas)
            except Exception as exc:
                self._log_failure(pin, f"loading {ref} failed: {exc or type(exc).__name__}")
                return False
        if not where:
            self._log_failure(pin, f"no replica is ready to load {ref}", logging.INFO)
            return False
        changed = self._warmed.get(pin) != (ref, replicas) or self._where.get(pin) != list(where)
        self._warmed[pin], self._where[pin] = (ref, replicas), list(where)
        self._failed.pop(pin, None)
        if changed:
            logger.info("pin %s: %s loaded on replica(s) %s", pin, ref, ", ".join(where))
        return True

    def _log_failure(self, pin: str, why: str, level: int = logging.WARNING) -> None:
        """Logged the first time, then only when the reason changes: a pass runs every
        ``pin_refresh_seconds`` and a replica that is down stays down for many of them."""
        if self._failed.get(pin) != why:
            logger.log(level, "pin %s: %s; trying again at the next pass", pin, why)
            self._failed[pin] = why

    # -- an alias moved through this gateway -------------------------------------------------

    async def before_move(self, adapter: str, alias: str, version: int) -> None:
        """Load ``adapter@version`` on the pin's replicas before ``adapter:alias`` moves to it, if
        the alias is pinned (bounded by ``BEFORE_MOVE_TIMEOUT``: a move, a rollback above all,
        must never be held up by a replica that cannot load)."""
        try:
            ref = parse_adapter(adapter)
            pins = await asyncio.to_thread(self.pins.list, ref.tenant)
            pin = next((p for p in pins if p.pin == f"{ref.adapter}:{alias}"), None)
            if pin is None:
                return
            info = await asyncio.to_thread(self.registry.resolve, Ref(ref.tenant, ref.name, version=version))
        except AdapterdeckError:  # the move itself will say what is wrong
            return
        except Exception as exc:  # the database: the move will meet it too; warming must not fail it
            logger.warning("cannot tell whether %s:%s is pinned (%s); moving it cold", adapter, alias, exc)
            return
        if ENGINE_VLLM not in info.served_by:
            return
        try:
            await asyncio.wait_for(self._warm(pin.pin, info.ref, pin.replicas), BEFORE_MOVE_TIMEOUT)
        except TimeoutError:
            logger.warning(
                "pin %s: %s not loaded within %.0f s; moving the alias anyway",
                pin.pin,
                info.ref,
                BEFORE_MOVE_TIMEOUT,
            )
