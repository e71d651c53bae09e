"""Which replica serves a request: adapter-affinity routing, pure (no I/O; the caller passes the
time), so every rule below is unit-tested.

- Each adapter (an immutable ``tenant/name@N``) ranks the healthy replicas by rendezvous
  (highest-random-weight) hashing of its name and each replica's URL; its first ``k`` replicas are
  its place. Every gateway computes the same order from the same URLs, and a replica that goes
  away moves only its own adapters (each to its next replica in its order); one that comes back
  takes back exactly what it had.
- ``k`` follows the adapter's load: a moving average (EWMA over ``load_window`` seconds) of its
  in-flight requests. Above ``spread_load`` per replica it gets one more replica (up to
  ``k_max``); it gives one back when, with one replica less, it would stay under ``shrink_load``
  and it has kept its ``k`` for ``shrink_after`` seconds (the hysteresis: no flapping).
- Bounded load (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam): no
  replica is chosen whose in-flight requests would pass cap(ε) = ceil((1 + ε) * (all in-flight +
  1) / healthy replicas) while another would not, with ε = ``load_factor``.
- The cost of a cold start counts: a request leaves its ``k`` replicas only for one under the
  cap, and there for one that already holds the adapter; it is sent where it would have to be
  loaded (a load, and an eviction of another adapter there) only when none of its ``k`` replicas
  that hold it is under the wider cap of ε = ``cold_load_factor``.
- Batch slots count (``batch_slots``, as llm-d scores a replica higher where the adapter runs or
  a LoRA slot is free): vLLM runs at most ``max_loras`` adapters in one batch, and a request to
  another waits in that replica's queue until a slot frees. A replica *can run* the adapter at once
  when its requests run there already (they share the slot) or it has a free slot (the gateway
  counts its own requests in flight there, by adapter). In order:
  1. its ``k`` replicas under cap(``load_factor``): one that can run it at once first, resident
     next, then the least loaded (so a hot adapter's requests split over its ``k`` replicas), then
     the highest rendezvous score; when that one cannot run it at once, another replica under the
     cap that holds it and can run it at once takes it (no load, no wait);
  2. the other replicas under that cap that hold it, in its rendezvous order (one that can run it
     at once first);
  3. its ``k`` replicas that hold it, under cap(``cold_load_factor``), unless the one chosen
     would queue it behind a full batch while a replica of step 4 can run it at once (there it
     waits for no one: a load costs less than a wait);
  4. the other replicas under cap(``load_factor``), in its rendezvous order (a cold overflow;
     one that can run it at once first);
  5. the least loaded.
  So the bound every replica keeps is ``cold_load_factor``'s; ``load_factor``'s holds wherever
  keeping it costs no load.
- The base model needs no loading: the least loaded healthy replica.
- ``fleet.policy`` ``round_robin`` or ``least_loaded`` replaces all of the above for adapters by a
  baseline blind to them (what affinity is measured against in ``bench/fleet.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from adapterdeck.serve.settings import FleetSettings

MAX_TRACKED = 100_000  # adapters whose load is remembered (idle ones are forgotten first)


class Routable(Protocol):
    """What routing needs of a replica."""

    url: str
    in_flight: int

    def holds(self, name: str) -> bool: ...

    def can_run(self, name: str) -> bool: ...


R = TypeVar("R", bound=Routable)


def score(name: str, url: str) -> int:
    """The rendezvous weight of replica ``url`` for ``name``: a stable 64-bit hash of both."""
    digest = hashlib.blake2b(f"{name}\0{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(name: str, replicas: Sequence[R]) -> list[R]:
    """``replicas`` in ``name``'s rendezvous order, highest weight first."""
    return sorted(replicas, key=lambda r: (score(name, r.url), r.url), reverse=True)


def load_cap(replicas: Sequence[Routable], load_factor: float) -> int:
    """The most in-flight requests a replica may hold after taking one more."""
    total = sum(r.in_flight for r in replicas)
    return math.ceil((1 + load_factor) * (total + 1) / len(replicas))


@dataclass
class AdapterLoad:
    """One adapter's load: in flight now, its moving average, and its replica count ``k``."""

    k: int
    since: float  # when ``k`` last changed
    seen: float  # when ``average`` was last brought up to date
    in_flight: int = 0
    average: float = 0.0


class Router:
    """Routing decisions and the per-adapter load they depend on (see the module docstring)."""

    def __init__(self, settings: FleetSettings, max_tracked: int = MAX_TRACKED) -> None:
        self.settings = settings
        self.max_tracked = max_tracked
        self.loads: OrderedDict[str, AdapterLoad] = OrderedDict()
        self.floors: OrderedDict[str, int] = OrderedDict()  # k at least, for pinned adapters
        self.turn = 0  # the next replica of the round-robin baseline

    # -- load --------------------------------------------------------------------------------

    def _load(self, name: str, now: float) -> AdapterLoad:
        load = self.loads.get(name)
        if load is None:
            load = self.loads[name] = AdapterLoad(k=self.floor(name), since=now, seen=now)
            self._forget_idle()
        else:
            self.loads.move_to_end(name)
            # The in-flight count held since ``seen``: the exact continuous-time EWMA.
            weight = 1 - math.exp(-max(0.0, now - load.seen) / self.settings.load_window)
            load.average += weight * (load.in_flight - load.average)
            load.seen = now
        return load

    def _forget_idle(self) -> None:
        while len(self.loads) > self.max_tracked:
            name, oldest = next(iter(self.loads.items()))
            if oldest.in_flight:
                break
            del self.loads[name]

    def started(self, name: str, now: float) -> None:
        """A request to ``name`` went out."""
        self._load(name, now).in_flight += 1

    def finished(self, name: str, now: float) -> None:
        """A request to ``name`` is over (answered, failed or broken off)."""
        load = self._load(name, now)
        load.in_flight = max(0, load.in_flight - 1)

    def floor(self, name: str) -> int:
        return max(self.settings.k_min, self.floors.get(name, 0))

    def set_floor(self, name: str, k: int) -> None:
        """Keep ``name`` on ``k`` replicas at least (a pinned adapter on the replicas it was warmed on)."""
        self.floors[name] = k
        self.floors.move_to_end(name)
        while len(self.floors) > self.max_tracked:
            self.floors.popitem(last=False)
        if name in self.loads:
            self.loads[name].k = max(self.loads[name].k, k)

    def spread(self, name: str, now: float, healthy: int) -> int:
        """``name``'s replica count now (at most ``healthy``), grown or shrunk by its load."""
        s = self.settings
        load = self._load(name, now)
        floor = self.floor(name)
        if load.k < min(s.k_max, healthy) and load.average / load.k > s.spread_load:
            load.k, load.since = load.k + 1, now
        elif (
            load.k > floor
            and load.average / (load.k - 1) < s.shrink_load
            and now - load.since >= s.shrink_after
        ):
            load.k, load.since = load.k - 1, now
        load.k = max(load.k, floor)
        return max(1, min(load.k, healthy))

    # -- choices -----------------------------------------------------------------------------

    def placement(self, name: str, replicas: Sequence[R], k: int) -> list[R]:
        """``name``'s first ``k`` replicas: where it is placed (and warmed)."""
        return ranked(name, replicas)[: max(1, k)]

    def choose(self, name: str, replicas: Sequence[R], now: float) -> R | None:
        """The replica for a request to adapter ``name`` among the healthy ``replicas`` (None: none)."""
        if not replicas:
            return None
        if self.settings.policy != "affinity":
            return self.baseline(replicas)
        order = ranked(name, replicas)
        k = self.spread(name, now, len(order))
        home, rest = order[:k], order[k:]
        cap = load_cap(order, self.settings.load_factor)
        # ``min`` keeps the first of equals: the highest weight.
        allowed = [r for r in home if r.in_flight + 1 <= cap]
        ready_key = lambda r: (not self.runs_now(r, name), not r.holds(name), r.in_flight)  # noqa: E731
        best = min(allowed, key=ready_key) if allowed else None
        if best is not None and self.runs_now(best, name):
            return best
        # Its place would queue it behind a full batch (or is full): a replica that holds it takes
        # it (no load), one that can run it at once first; else it waits at home.
        warm = (r for r in rest if r.holds(name) and r.in_flight + 1 <= cap)
        chosen = self.ready_first(name, warm, best)
        if chosen is not None:
            return chosen
        wide = load_cap(order, self.settings.cold_load_factor)
        allowed = [r for r in home if r.holds(name) and r.in_flight + 1 <= wide]
        best = min(allowed, key=lambda r: r.in_flight) if allowed else None
        if best is not None and self.runs_now(best, name):
            return best
        # Past the tight bound and behind a full batch, it would wait: a load costs less.
        cold = (r for r in rest if r.in_flight + 1 <= cap)
        chosen = self.ready_first(name, cold, best)
        if chosen is not None:
            return chosen
        return min(order, key=lambda r: r.in_flight)  # not reached: the cap leaves room somewhere

    def ready_first(self, name: str, candidates: Iterable[R], fallback: R | None) -> R | None:
        """The first of ``candidates`` that can run ``name`` at once; when ``fallback`` is None, else
        the first of them; else ``fallback`` (a request that would queue anyway stays there)."""
        first = None
        for r in candidates:
            if self.runs_now(r, name):
                return r
            first = first or r
        return fallback if fallback is not None else first

    def runs_now(self, replica: Routable, name: str) -> bool:
        """Whether ``name`` would run on ``replica`` at once (always, with ``batch_slots`` off)."""
        return not self.settings.batch_slots or replica.can_run(name)

    def baseline(self, replicas: Sequence[R]) -> R:
        """``fleet.policy``'s baselines, blind to adapters (to measure affinity against):
        round_robin takes the replicas in turn, least_loaded the one with the fewest in flight."""
        order = sorted(replicas, key=lambda r: r.url)
        if self.settings.policy == "round_robin":
            self.turn += 1
            return order[self.turn % len(order)]
        return min(order, key=lambda r: r.in_flight)

    def choose_base(self, name: str, replicas: Sequence[R]) -> R | None:
        """The least loaded healthy replica (ties: ``name``'s rendezvous order, so it is stable)."""
        if not replicas:
            return None
        return min(ranked(name, replicas), key=lambda r: r.in_flight)
