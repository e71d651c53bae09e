"""The vLLM replicas behind the gateway: the ones ``serve`` starts (each a ``VllmSupervisor`` on
its own port, log and cores or GPUs) and the ones at ``vllm.url``/``vllm.urls``; which of them is
healthy, what each holds in flight, and which adapters each has loaded, as far as this gateway
knows (what it sent there, bounded as vLLM's LRU cache is, and what the replica's ``/metrics``
says it runs).

A replica is taken out at once when a request to it cannot connect or breaks off, or when its
``/health`` fails (polled every ``fleet.health_interval``), and comes back when ``/health``
passes again: then it has forgotten its adapters if it restarted, and every ``on_replica_ready``
callback is called with it (the first time it is ready too).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from adapterdeck.serve.engines.process import VllmSupervisor, placement_env, visible_gpus
from adapterdeck.serve.fleet.probe import ReplicaMetrics, models_problem, parse_metrics
from adapterdeck.serve.fleet.router import Router
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.settings import ServeSettings
from adapterdeck.serve.target import Target

logger = logging.getLogger("adapterdeck.serve")
HEALTH_TIMEOUT = 1.0
METRICS_TIMEOUT = 2.0
# A replica whose /health has not answered for this long is taken out while another serves (one
# that refuses the connection or answers an error is out at once).
HEALTH_GRACE = 1.0
ReadyCallback = Callable[["Replica"], Awaitable[None] | None]
WarmCall = Callable[["Replica", str], Awaitable[bool]]


def supervisors(settings: ServeSettings, env: dict[str, str], log_dir: Path) -> list[VllmSupervisor]:
    """The vLLM servers ``serve`` starts: ``vllm.local_replicas()`` of them on consecutive ports,
    each with its log and its share of the cores or GPUs."""
    count = settings.vllm.local_replicas()
    usable = getattr(os, "sched_getaffinity", None)
    cpus = sorted(usable(0)) if usable else list(range(os.cpu_count() or 1))
    gpus = visible_gpus()
    found = []
    for i in range(count):
        port = settings.vllm.port + i
        placed = {**env, **placement_env(i, count, cpus, gpus)}
        found.append(VllmSupervisor(settings, placed, log_dir / f"adapterdeck-vllm-{port}.log", port))
    return found


class Replica:
    """One vLLM server as the gateway sees it (see the module docstring)."""

    def __init__(
        self,
        index: int,
        url: str,
        capacity: int,
        supervisor: VllmSupervisor | None = None,
        key: str | None = None,
        slots: int | None = None,
    ) -> None:
        self.id = str(index)
        self.url = url.rstrip("/")
        self.capacity = capacity  # adapters it keeps loaded (vLLM's --max-cpu-loras, an LRU)
        self.supervisor = supervisor
        self._key = key
        self.healthy = False
        self.in_flight = 0
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.problem: str | None = None  # why a replica at a URL is refused (not vLLM, another base)
        self.verified = supervisor is not None
        self.incarnation: Any = None  # the supervisor's restarts, or the process start time
        self.max_lora = slots  # adapters in one batch (vLLM's --max-loras; its /metrics corrects it)
        self.running: Counter[str] = Counter()  # this gateway's requests in flight here, by adapter
        self.comebacks = 0
        self.was_up = False
        self.last_ok = 0.0  # when /health last answered
        self.checking = False
        self.lost: asyncio.Future[None] | None = None  # done when taken out: its requests stop waiting

    def headers(self) -> dict[str, str]:
        """The engine's API key (the current one for a vLLM this gateway started)."""
        key = self.supervisor.api_key if self.supervisor is not None else self._key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def holds(self, name: str) -> bool:
        return name in self.resident

    def can_run(self, name: str) -> bool:
        """A request to ``name`` would join the running batch at once: ``name``'s requests run here
        already, or one of the batch's LoRA slots is free (else it waits in vLLM's queue)."""
        return name in self.running or self.max_lora is None or len(self.running) < self.max_lora

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts if self.supervisor is not None else self.comebacks

    @property
    def status(self) -> str:
        if self.healthy:
            return "ready"
        if self.problem is not None:
            return "refused"
        if self.supervisor is not None and not self.supervisor.ready.is_set():
            return "starting"
        return "unreachable"

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"id": self.id, "url": self.url, "status": self.status}
        if self.supervisor is not None:
            report["pid"] = self.supervisor.pid()
        if self.problem is not None:
            report["problem"] = self.problem
        report.update(in_flight=self.in_flight, resident=list(self.resident), restarts=self.restarts)
        return report


class Fleet:
    """All replicas, their health and load, and the router that picks one for each request."""

    def __init__(
        self,
        settings: ServeSettings,
        supervised: list[VllmSupervisor],
        metrics: Metrics,
        key: str | None = None,
        warm_with: WarmCall | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.router = Router(settings.fleet)
        capacity = settings.vllm.max_cpu_loras
        slots = settings.vllm.max_loras
        self.replicas = [
            Replica(i, s.url, capacity, supervisor=s, slots=slots) for i, s in enumerate(supervised)
        ]
        for url in settings.vllm.endpoints():
            self.replicas.append(Replica(len(self.replicas), url, capacity, key=key, slots=slots))
        self.client: aiohttp.ClientSession | None = None
        self._warm_with = warm_with
        self._callbacks: list[ReadyCallback] = []
        self._tasks: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        self._metrics_due: dict[str, float] = {}
        for replica in self.replicas:
            self.metrics.replica_up.labels(replica.id).set(0)

    # -- life ----------------------------------------------------------------------------------

    async def open(self) -> None:
        self.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=600, sock_connect=2),
            # Idle connections are dropped before vLLM's own keep-alive (5 s) drops them, so no
            # request goes out on a connection the server is closing.
            connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=4),
            read_bufsize=2**20,  # SSE lines (a chunk with logprobs) up to 2 MiB
        )
        for replica in self.replicas:
            if replica.supervisor is not None:
                await replica.supervisor.start()
        await self._check_all()  # a running replica serves the first request already
        self._poller = asyncio.create_task(self._poll(), name="fleet-health")

    async def close(self) -> None:
        tasks = [t for t in [self._poller, *self._tasks] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.supervisor.stop() for r in self.replicas if r.supervisor is not None))
        if self.client is not None:
            await self.client.close()

    def on_replica_ready(self, callback: ReadyCallback) -> None:
        """Call ``callback(replica)`` each time a replica becomes healthy: at start, after a
        restart, when it answers again. A coroutine function runs as a task of its own."""
        self._callbacks.append(callback)

    # -- routing -------------------------------------------------------------------------------

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def choose(self, target: Target, exclude: list[Replica] | tuple[Replica, ...] = ()) -> Replica | None:
        """The replica for ``target`` (``serve/fleet/router.py``), among the healthy ones not in
        ``exclude``; None when there is none."""
        candidates = [r for r in self.healthy() if r not in exclude]
        if target.is_base:
            return self.router.choose_base(target.name, candidates)
        return self.router.choose(target.name, candidates, time.monotonic())

    def begin(self, replica: Replica, target: Target) -> None:
        replica.in_flight += 1
        self.metrics.replica_in_flight.labels(replica.id).inc()
        if not target.is_base:
            replica.running[target.name] += 1
            self.router.started(target.name, time.monotonic())

    def end(self, replica: Replica, target: Target) -> None:
        replica.in_flight -= 1
        self.metrics.replica_in_flight.labels(replica.id).dec()
        if not target.is_base:
            replica.running[target.name] -= 1
            if replica.running[target.name] <= 0:
                del replica.running[target.name]
            self.router.finished(target.name, time.monotonic())

    def admit(self, replica: Replica, name: str) -> bool:
        """Note that ``name`` is (being) loaded on ``replica``; True when it was not there: this
        request loads it. The least recently used adapter over the replica's capacity is evicted,
        as vLLM's LRU cache does."""
        fresh = name not in replica.resident
        replica.resident[name] = None
        replica.resident.move_to_end(name)
        while len(replica.resident) > replica.capacity:
            replica.resident.popitem(last=False)
            self.metrics.replica_evictions.labels(replica.id).inc()
        self.metrics.replica_resident.labels(replica.id).set(len(replica.resident))
        return fresh

    def unadmit(self, replica: Replica, name: str) -> None:
        """The request that was to load ``name`` failed: it is not resident after all."""
        replica.resident.pop(name, None)
        self.metrics.replica_resident.labels(replica.id).set(len(replica.resident))

    def loaded(self, replica: Replica, seconds: float) -> None:
        """A request loaded an adapter on ``replica`` and took ``seconds`` (its cold start)."""
        self.metrics.replica_loads.labels(replica.id).inc()
        self.metrics.replica_cold_start.labels(replica.id).observe(seconds)

    def failed(self, replica: Replica) -> None:
        """A request to ``replica`` could not connect or broke off: out now, checked again at once."""
        if replica.healthy:
            logger.warning("vLLM replica %s at %s failed a request: taken out", replica.id, replica.url)
            self._went_down(replica)
        self._spawn(self._check(replica))

    # -- pins ----------------------------------------------------------------------------------

    async def warm(self, name: str, k: int | None = None) -> list[str]:
        """Make ``name`` (an immutable ref) resident on its ``k`` replicas now (default: as many as
        its load gives it; a given ``k`` is kept as its least), by a one-token completion through
        the normal path on each where it is not yet. The ids of the replicas that hold it."""
        healthy = self.healthy()
        if not healthy or self._warm_with is None:
            return []
        if k is not None:
            self.router.set_floor(name, k)
        count = k if k is not None else self.router.spread(name, time.monotonic(), len(healthy))
        chosen = self.router.placement(name, healthy, count)
        warm_with = self._warm_with
        done = await asyncio.gather(*(self._warmed(r, name, warm_with) for r in chosen))
        return [r.id for r, ok in zip(chosen, done, strict=True) if ok]

    @staticmethod
    async def _warmed(replica: Replica, name: str, warm_with: WarmCall) -> bool:
        return replica.holds(name) or await warm_with(replica, name)

    # -- health --------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """``/health``'s view: each replica (id, url, status, in flight, resident adapters,
        restarts); with one replica its fields at the top too, as before there was a fleet."""
        replicas = [r.report() for r in self.replicas]
        ready = sum(r.healthy for r in self.replicas)
        status = "ready" if ready == len(self.replicas) else "degraded" if ready else "unavailable"
        if len(replicas) == 1:
            return {**replicas[0], "replicas": replicas}
        return {"status": status, "ready": ready, "replicas": replicas}

    def _spawn(self, job: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self) -> None:
        """Each replica checked on its own, so a slow one delays no other's check. One that stopped
        answering is taken out while another serves; the last one left is kept while it is only
        slow (its requests wait, as they would without a fleet)."""
        while True:
            await asyncio.sleep(self.settings.fleet.health_interval)
            now = time.monotonic()
            for replica in self.replicas:
                silent = now - replica.last_ok
                if replica.healthy and silent > HEALTH_GRACE and len(self.healthy()) > 1:
                    logger.warning(
                        "vLLM replica %s at %s has not answered /health for %.1f s: taken out",
                        replica.id, replica.url, silent,
                    )  # fmt: skip
                    self._went_down(replica)
                if not replica.checking:
                    self._spawn(self._check(replica))

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(r) for r in self.replicas))

    async def _get(self, replica: Replica, path: str, timeout: float = HEALTH_TIMEOUT) -> tuple[int, bytes]:
        assert self.client is not None
        wait = aiohttp.ClientTimeout(total=timeout)
        async with self.client.get(f"{replica.url}{path}", headers=replica.headers(), timeout=wait) as reply:
            return reply.status, await reply.read()

    async def _check(self, replica: Replica) -> None:
        if replica.checking:
            return
        replica.checking = True
        try:
            await self._check_once(replica)
        except Exception:  # one bad check must not end the health checks
            logger.exception("checking vLLM replica %s failed", replica.id)
        finally:
            replica.checking = False

    async def _check_once(self, replica: Replica) -> None:
        ok = await self._answers(replica)
        if ok:
            replica.last_ok = time.monotonic()
        if ok and not replica.healthy:
            await self._came_up(replica)
        elif ok is False and replica.healthy:
            logger.warning(
                "vLLM replica %s at %s does not answer /health: taken out", replica.id, replica.url
            )
            self._went_down(replica)
        if replica.healthy and time.monotonic() >= self._metrics_due.get(replica.id, 0):
            found = await self._fetch_metrics(replica)
            if found is not None:
                self._apply(replica, found)

    async def _answers(self, replica: Replica) -> bool | None:
        """True: healthy; False: down (exited, refused, reset, an error); None: no answer in time."""
        if replica.supervisor is not None and not replica.supervisor.ready.is_set():
            return False
        try:
            status, _ = await self._get(replica, "/health")
        except TimeoutError:
            return None
        except aiohttp.ClientError:
            return False
        return status == 200

    async def _came_up(self, replica: Replica) -> None:
        if not replica.verified and not await self._verify(replica):
            return
        found = await self._fetch_metrics(replica)
        started = found.started if found is not None else None
        incarnation = replica.supervisor.restarts if replica.supervisor is not None else started
        if incarnation is None or incarnation != replica.incarnation:
            replica.resident.clear()  # a new process: nothing is loaded yet
            self.metrics.replica_resident.labels(replica.id).set(0)
        if replica.was_up and replica.supervisor is None:
            replica.comebacks += 1
        replica.incarnation, replica.was_up = incarnation, True
        if found is not None:
            self._apply(replica, found)
        replica.healthy, replica.last_ok = True, time.monotonic()
        replica.lost = asyncio.get_running_loop().create_future()
        self.metrics.replica_up.labels(replica.id).set(1)
        logger.info("vLLM replica %s at %s is ready", replica.id, replica.url)
        for callback in self._callbacks:
            try:
                result = callback(replica)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:
                logger.exception("a ready callback failed for vLLM replica %s", replica.id)

    def _went_down(self, replica: Replica) -> None:
        replica.healthy = False
        if replica.lost is not None and not replica.lost.done():
            replica.lost.set_result(None)
        self.metrics.replica_up.labels(replica.id).set(0)
        self.metrics.replica_failures.labels(replica.id).inc()

    async def _verify(self, replica: Replica) -> bool:
        """A replica at a URL that did not answer at start: is it a vLLM serving the base?"""
        try:
            status, content = await self._get(replica, "/v1/models", timeout=5)
        except (aiohttp.ClientError, TimeoutError):
            return False
        try:
            payload: Any = json.loads(content)
        except ValueError:
            payload = None
        problem = models_problem(status, payload, self.settings)
        if problem is not None and problem != replica.problem:
            logger.error("vLLM replica %s at %s is refused: %s", replica.id, replica.url, problem)
        replica.problem, replica.verified = problem, problem is None
        return problem is None

    async def _fetch_metrics(self, replica: Replica) -> ReplicaMetrics | None:
        """What ``replica``'s ``/metrics`` says (None: it does not tell)."""
        self._metrics_due[replica.id] = time.monotonic() + self.settings.fleet.metrics_interval
        try:
            status, content = await self._get(replica, "/metrics", timeout=METRICS_TIMEOUT)
        except (aiohttp.ClientError, TimeoutError):
            return None
        return parse_metrics(content.decode(errors="replace")) if status == 200 else None

    def _apply(self, replica: Replica, found: ReplicaMetrics) -> None:
        """Correct ``replica``'s residency: the adapters vLLM runs or queues now are loaded there,
        whoever sent them (vLLM's metric forgets idle ones, so it never removes any)."""
        replica.max_lora = found.max_lora or replica.max_lora
        for name in found.adapters:
            if name in replica.resident:
                replica.resident.move_to_end(name)
            else:
                self.admit(replica, name)
