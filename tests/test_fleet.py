"""The fleet: several vLLM replicas behind one gateway with adapter-affinity routing.

The router (``serve/fleet/router.py``) is pure: its rules are tested on stand-in replicas. What a
replica tells about itself (``probe.py``) and where each replica runs (``placement_env``) are
pure too. The fleet itself (health, failover, the retry) runs against stand-ins for vLLM (HTTP
servers that answer like it), and the gateway's start-up check against a plain HTTP server. The
tests marked ``vllm`` run ``adapterdeck serve --replicas 2`` with two real vLLM servers (CPU build)
and kill one of them under load.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapterdeck.core.methods import ENGINE_VLLM
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.tenants import create_key
from adapterdeck.serve.engines.process import placement_env, port_taken, share
from adapterdeck.serve.engines.vllm import VllmEngine
from adapterdeck.serve.errors import ApiError
from adapterdeck.serve.fleet.probe import models_problem, parse_metrics
from adapterdeck.serve.fleet.router import Router, load_cap, ranked
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.settings import FleetSettings, ServeSettings
from adapterdeck.serve.target import REPLICA_HEADER, Outcome, Target

from .conftest import free_port, run_cli
from .gateway_helpers import ServeProcess, launch, wait_ready
from .registry_helpers import make_lora


@dataclass(eq=False)
class Stand:
    """A replica as the router sees it."""

    url: str
    in_flight: int = 0
    resident: set[str] = field(default_factory=set)

    running: set[str] = field(default_factory=set)  # adapters with requests in flight there
    slots: int | None = None  # vLLM's max_loras (None: not limited)

    def holds(self, name: str) -> bool:
        return name in self.resident

    def can_run(self, name: str) -> bool:
        return name in self.running or self.slots is None or len(self.running) < self.slots


def stands(n: int) -> list[Stand]:
    return [Stand(f"http://10.0.0.{i}:8000") for i in range(n)]


ADAPTERS = [f"acme/a{i}@1" for i in range(1000)]


# -- the router ------------------------------------------------------------------------------------


def test_an_adapter_s_requests_stay_on_its_k_replicas() -> None:
    replicas = stands(4)
    for r in replicas:
        r.in_flight = 3  # other traffic, evenly spread
    for k in (1, 2):
        router = Router(FleetSettings(k_min=k, k_max=k))
        for name in ADAPTERS[:200]:
            place = router.placement(name, replicas, k)
            served = set()
            for _ in range(10):
                chosen = router.choose(name, replicas, 0.0)
                assert chosen is not None
                served.add(chosen.url)
                chosen.resident.add(name)
            assert served == {place[0].url}, name  # on one of its k, the same one while it is not full
        # Under its own load it fills its k replicas up to the bound, and no other while they have room.
        for name in ADAPTERS[:50] if k == 2 else []:
            served, taken = set(), []
            for _ in range(4):
                chosen = router.choose(name, replicas, 0.0)
                assert chosen is not None
                served.add(chosen.url)
                chosen.in_flight += 1
                taken.append(chosen)
            for chosen in taken:
                chosen.in_flight -= 1
            assert served <= {r.url for r in router.placement(name, replicas, k)}, name
            assert len(served) == k, name
    # The adapters spread over all replicas (no hotspot by construction).
    firsts = Counter(ranked(name, replicas)[0].url for name in ADAPTERS)
    assert len(firsts) == 4 and min(firsts.values()) > 180, firsts


def test_k_grows_with_load_and_shrinks_with_hysteresis() -> None:
    settings = FleetSettings(
        k_min=1, k_max=3, spread_load=2.0, shrink_load=0.5, shrink_after=10, load_window=1
    )
    router, hot, cold = Router(settings), "acme/hot@1", "acme/cold@1"
    now = 0.0
    for _ in range(12):
        router.started(hot, now)
    router.started(cold, now)
    assert router.spread(hot, now, 4) == 1  # the average has not seen the load yet
    ks = []
    for _ in range(10):
        now += 1.0
        ks.append(router.spread(hot, now, 4))
    assert ks[-1] == 3 and ks == sorted(ks), ks  # one more replica at a time, up to k_max
    assert router.spread(cold, now, 4) == 1  # one request in flight: it stays on one replica
    assert router.spread(hot, now, 2) == 2  # never more than the healthy replicas
    # The load goes away: k stays until the average has fallen *and* shrink_after has passed
    # since k last changed; then it gives back one replica at a time.
    router, now = Router(settings), 0.0
    for _ in range(12):
        router.started(hot, now)
    assert [router.spread(hot, t, 4) for t in (1.0, 2.0)] == [2, 3]
    grown = 2.0
    for _ in range(12):
        router.finished(hot, grown)
    assert router.spread(hot, grown + 0.1, 4) == 3  # the average is still high
    assert router.spread(hot, grown + 5, 4) == 3  # the average is low, but too soon
    assert router.spread(hot, grown + 10.5, 4) == 2
    assert router.spread(hot, grown + 11.5, 4) == 2  # each step waits shrink_after again
    assert router.spread(hot, grown + 21, 4) == 1
    assert router.spread(hot, grown + 100, 4) == 1  # k_min
    # Hysteresis: a load between the thresholds neither grows nor shrinks k.
    router2 = Router(settings)
    for _ in range(3):
        router2.started("acme/mid@1", 0.0)
    assert [router2.spread("acme/mid@1", t, 4) for t in (5.0, 10.0, 50.0, 100.0)] == [2, 2, 2, 2]


def test_bounded_load_holds_under_a_hot_adapter() -> None:
    rng = random.Random(0)
    replicas = stands(4)
    settings = FleetSettings(load_factor=0.25)
    router = Router(settings)
    inflight: list[tuple[Stand, str]] = []
    names = ["acme/hot@1"] * 8 + ADAPTERS[:20]  # one adapter has 8 times the others' traffic
    for _ in range(3000):
        if inflight and rng.random() < 0.45:
            replica, name = inflight.pop(rng.randrange(len(inflight)))
            replica.in_flight -= 1
            router.finished(name, 0.0)
            continue
        name = rng.choice(names)
        cap = load_cap(replicas, settings.load_factor)
        wide = load_cap(replicas, settings.cold_load_factor)
        chosen = router.choose(name, replicas, 0.0)
        assert chosen is not None
        # The tight bound, unless keeping it would mean a load; the wide one always.
        assert chosen.in_flight + 1 <= (cap if chosen.holds(name) is False else wide), (chosen.in_flight, cap)
        chosen.in_flight += 1
        chosen.resident.add(name)
        router.started(name, 0.0)
        inflight.append((chosen, name))
    assert {r.url for r, name in inflight if name == "acme/hot@1"} != {ranked("acme/hot@1", replicas)[0].url}


def test_a_resident_replica_is_preferred_among_the_allowed() -> None:
    replicas = stands(3)
    name = ADAPTERS[0]
    router = Router(FleetSettings(k_min=2, k_max=2))
    first, second, third = ranked(name, replicas)
    assert router.choose(name, replicas, 0.0) is first  # nowhere resident: the highest weight
    second.resident.add(name)
    assert router.choose(name, replicas, 0.0) is second  # resident, within its k
    third.resident.add(name)
    assert router.choose(name, replicas, 0.0) is second  # resident outside its k is not preferred
    # Both of its k replicas are full: it overflows, to where it is resident first.
    router1 = Router(FleetSettings(k_min=1, k_max=1))
    second.resident.discard(name)
    first.in_flight = 10
    assert router1.choose(name, replicas, 0.0) is third
    third.resident.discard(name)
    assert router1.choose(name, replicas, 0.0) is second  # then its rendezvous order


def test_a_request_is_sent_where_it_must_be_loaded_only_past_the_wider_bound() -> None:
    replicas = stands(2)
    name = ADAPTERS[3]
    router = Router(FleetSettings(load_factor=0.5, cold_load_factor=0.75))
    home, other = ranked(name, replicas)
    home.resident.add(name)
    # 8 in flight: cap(0.5) = ceil(1.5 * 9 / 2) = 7, cap(0.75) = ceil(1.75 * 9 / 2) = 8.
    home.in_flight, other.in_flight = 7, 1
    assert router.choose(name, replicas, 0.0) is home  # over the tight cap, but the other is cold
    other.resident.add(name)
    assert router.choose(name, replicas, 0.0) is other  # resident there too: no load, so it moves
    other.resident.clear()
    home.in_flight, other.in_flight = 12, 0  # cap(0.75) = ceil(1.75 * 13 / 2) = 12: past it
    assert router.choose(name, replicas, 0.0) is other
    # Not resident at home either: nothing to keep, the tight cap decides.
    home.resident.clear()
    home.in_flight = 7
    assert router.choose(name, replicas, 0.0) is other
    with pytest.raises(ValueError, match="cold_load_factor must be at least load_factor"):
        FleetSettings(load_factor=0.5, cold_load_factor=0.25)


def test_a_request_goes_where_its_adapter_can_run_at_once() -> None:
    """vLLM batches at most max_loras adapters: a request to another waits for a slot. The router
    prefers a replica where the adapter runs already or a slot is free, among those it would choose
    anyway, and leaves its place for one that holds it and can run it (never for a cold one)."""
    replicas = stands(3)
    for r in replicas:
        r.slots, r.in_flight = 2, 2
    name = ADAPTERS[5]
    router = Router(FleetSettings(k_min=2, k_max=2))
    first, second, third = ranked(name, replicas)
    first.running, second.running = {"x", "y"}, {"z"}
    first.resident.add(name)
    # Its k: the first holds it but its batch is full; the second has a free slot.
    assert router.choose(name, replicas, 0.0) is second
    second.running = {"z", "w"}  # both full now: residency decides, as before
    assert router.choose(name, replicas, 0.0) is first
    first.running = {"x", name}  # its requests run on the first: they share the slot
    second.running = {"z"}
    assert router.choose(name, replicas, 0.0) is first
    # k = 1: its place's batch is full; a replica that holds it and has a slot takes it, no load.
    one = Router(FleetSettings(k_min=1, k_max=1))
    first.running, second.running, third.running = {"x", "y"}, {"z", "w"}, {"v"}
    assert one.choose(name, replicas, 0.0) is first  # nowhere else holds it: it waits at home
    third.resident.add(name)
    assert one.choose(name, replicas, 0.0) is third
    third.in_flight = 9  # over the cap: the bound still holds
    assert one.choose(name, replicas, 0.0) is first
    third.in_flight = 2
    assert Router(FleetSettings(k_min=1, k_max=1, batch_slots=False)).choose(name, replicas, 0.0) is first
    # Past the tight bound at home (it holds it, under the wide one) and behind a full batch there:
    # a cold replica with a free slot takes it, a load rather than a wait; with room at home, never.
    third.resident.discard(name)
    first.in_flight, second.in_flight, third.in_flight = 5, 1, 1  # cap(0.5) = 4, cap(1.0) = 6
    first.running, second.running, third.running = {"x", "y"}, {"z", "w"}, {"v"}
    assert one.choose(name, replicas, 0.0) is third
    third.running = {"v", "u"}  # no slot anywhere: it waits at home rather than load
    assert one.choose(name, replicas, 0.0) is first


def test_a_dead_replica_moves_only_its_own_adapters_and_takes_them_back() -> None:
    replicas = stands(5)
    router = Router(FleetSettings())
    for k in (1, 2):
        before = {n: [r.url for r in router.placement(n, replicas, k)] for n in ADAPTERS}
        dead = replicas[2]
        alive = [r for r in replicas if r is not dead]
        after = {n: [r.url for r in router.placement(n, alive, k)] for n in ADAPTERS}
        moved = [n for n in ADAPTERS if before[n] != after[n]]
        assert all(dead.url in before[n] for n in moved)  # only the dead one's adapters moved
        assert all(dead.url not in before[n] for n in ADAPTERS if n not in moved)
        assert 0.7 * k * len(ADAPTERS) / 5 < len(moved) < 1.3 * k * len(ADAPTERS) / 5
        for n in moved:  # each keeps what it had on the live ones, plus the next in its order
            assert set(before[n]) - {dead.url} <= set(after[n])
        back = {n: [r.url for r in router.placement(n, replicas, k)] for n in ADAPTERS}
        assert back == before  # it came back: exactly its share again


def test_the_base_goes_to_the_least_loaded_replica() -> None:
    replicas = stands(3)
    router = Router(FleetSettings())
    for r, load in zip(replicas, (3, 1, 2), strict=True):
        r.in_flight = load
    assert router.choose_base("tiny", replicas) is replicas[1]
    assert router.choose_base("tiny", []) is None and router.choose("acme/a@1", [], 0.0) is None


def test_idle_adapters_are_forgotten_beyond_the_bound() -> None:
    router = Router(FleetSettings(), max_tracked=100)
    for i, name in enumerate(ADAPTERS):
        router.started(name, float(i))
        router.finished(name, float(i))
    assert len(router.loads) == 100


# -- what a replica tells ------------------------------------------------------------------------


def _vllm_models(*ids: str) -> dict[str, Any]:
    data = [
        {"id": i, "object": "model", "owned_by": "vllm", "root": f"/models/{i}", "parent": None} for i in ids
    ]
    data.append({"id": "acme/a@1", "object": "model", "owned_by": "vllm", "root": "/c", "parent": ids[0]})
    return {"object": "list", "data": data}


def test_the_models_check_tells_vllm_serving_the_base_from_anything_else() -> None:
    settings = ServeSettings(base="/models/tiny", served_name="tiny")
    assert models_problem(200, _vllm_models("tiny"), settings) is None
    assert (
        models_problem(200, _vllm_models("other"), settings)
        == "it serves /models/other, other, not the base tiny"
    )
    assert models_problem(401, None, settings) is None  # a key problem, told on every request
    assert "not a vLLM server" in (models_problem(404, None, settings) or "")
    assert "not a vLLM server" in (models_problem(200, {"data": "x"}, settings) or "")
    openai_like = {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "openai"}]}
    assert "not a vLLM server" in (models_problem(200, openai_like, settings) or "")


def test_the_lora_metric_gives_the_newest_running_and_waiting_adapters() -> None:
    text = "\n".join(
        [
            "# HELP vllm:lora_requests_info Running stats on lora requests.",
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="acme/a@1",'
            'waiting_lora_adapters=""} 1.7e9',
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="acme/b@1,acme/c@2",'
            'waiting_lora_adapters="acme/d@1"} 1.8e9',
            'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.75e9',
            "process_start_time_seconds 1.69e9",
        ]
    )
    found = parse_metrics(text)
    assert found.adapters == ["acme/b@1", "acme/c@2", "acme/d@1"]
    assert found.max_lora == 2 and found.started == 1.69e9
    assert parse_metrics("garbage\n").adapters == []


def test_each_replica_gets_its_share_of_the_cores_or_gpus() -> None:
    assert placement_env(0, 1, [0, 1], []) == {}  # one replica: vLLM's own choice, as before
    assert [placement_env(i, 2, [0, 1], []) for i in range(2)] == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0"},
        {"VLLM_CPU_OMP_THREADS_BIND": "1"},
    ]
    assert [placement_env(i, 2, [4, 5, 6, 7], [])["VLLM_CPU_OMP_THREADS_BIND"] for i in range(2)] == [
        "4,5",
        "6,7",
    ]
    assert [placement_env(i, 3, [0, 1], [])["VLLM_CPU_OMP_THREADS_BIND"] for i in range(3)] == ["0", "1", "0"]
    assert [placement_env(i, 2, [0, 1], ["0", "1", "2", "3"]) for i in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    assert share([], 0, 2) == []


def test_the_replica_settings_read_as_documented() -> None:
    one = ServeSettings(base="b")
    assert one.vllm.local_replicas() == 1 and one.vllm.endpoints() == []
    remote = ServeSettings.model_validate(
        {"base": "b", "vllm": {"url": "http://a:1/", "urls": ["http://b:2"]}}
    )
    assert remote.vllm.local_replicas() == 0 and remote.vllm.endpoints() == ["http://a:1", "http://b:2"]
    mixed = ServeSettings.model_validate({"base": "b", "vllm": {"urls": ["http://b:2"], "replicas": 2}})
    assert mixed.vllm.local_replicas() == 2
    with pytest.raises(ValueError, match="hysteresis"):
        FleetSettings(spread_load=1, shrink_load=1)


# -- the fleet against stand-ins for vLLM ----------------------------------------------------------


class FakeVllm(ThreadingHTTPServer):
    """Answers like vLLM's OpenAI server (health, models, metrics, completions); keeps each POST."""

    daemon_threads = True

    def __init__(self, served: str = "tiny", port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _FakeHandler)
        self.served = served
        self.posts: list[dict[str, Any]] = []
        self.running = ""
        self.hang = threading.Event()  # set: every request waits (a replica that stopped answering)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def kill(self) -> None:
        self.hang.clear()
        self.shutdown()
        self.server_close()


class _FakeHandler(BaseHTTPRequestHandler):
    server: FakeVllm

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        while self.server.hang.is_set():
            time.sleep(0.05)
        if self.path == "/health":
            self._answer(200, b"")
        elif self.path == "/v1/models":
            model = {
                "id": self.server.served,
                "object": "model",
                "owned_by": "vllm",
                "root": "/x",
                "parent": None,
            }
            self._answer(200, json.dumps({"object": "list", "data": [model]}).encode())
        elif self.path == "/metrics":
            line = f'vllm:lora_requests_info{{max_lora="2",running_lora_adapters="{self.server.running}",'
            self._answer(
                200, (line + 'waiting_lora_adapters=""} 1.0\nprocess_start_time_seconds 5.0\n').encode()
            )
        else:
            self._answer(404, b"{}")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        while self.server.hang.is_set():
            time.sleep(0.05)
        self.server.posts.append(body)
        answer = {"id": "c", "model": body["model"], "choices": [{"index": 0, "text": "x"}], "usage": {}}
        self._answer(200, json.dumps(answer).encode())

    def _answer(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _engine(*urls: str) -> VllmEngine:
    settings = ServeSettings.model_validate(
        {"base": "/x", "served_name": "tiny", "vllm": {"urls": list(urls)}, "fleet": {"health_interval": 0.1}}
    )
    return VllmEngine(settings, [], Metrics())


def _target(name: str) -> Target:
    return Target(name, ENGINE_VLLM, name.partition("/")[0])


def test_a_failed_replica_is_taken_out_and_the_request_retried_on_another() -> None:
    fakes = [FakeVllm(), FakeVllm()]

    async def run() -> None:
        engine = _engine(*(f.url for f in fakes))
        await engine.open()
        try:
            assert [r.healthy for r in engine.fleet.replicas] == [True, True]
            name = next(n for n in ADAPTERS if engine.fleet.choose(_target(n)) is engine.fleet.replicas[0])
            reply = await engine.forward("/v1/completions", {"prompt": "x"}, _target(name), Outcome())
            assert reply.headers[REPLICA_HEADER] == "0" and engine.fleet.replicas[0].holds(name)
            fakes[0].kill()  # refuses connections from now on; the fleet has not noticed yet
            reply = await engine.forward("/v1/completions", {"prompt": "x"}, _target(name), Outcome())
            assert reply.status_code == 200 and reply.headers[REPLICA_HEADER] == "1"
            assert not engine.fleet.replicas[0].healthy
            assert engine.fleet.report()["replicas"][0]["status"] == "unreachable"
            assert [r.in_flight for r in engine.fleet.replicas] == [0, 0]
            assert [dict(r.running) for r in engine.fleet.replicas] == [{}, {}]  # none left over
            fakes[1].kill()
            with pytest.raises(ApiError) as failed:
                await engine.forward("/v1/completions", {"prompt": "x"}, _target(name), Outcome())
            assert failed.value.status == 503
            # The first comes back (same port): the health poll returns it, and its share.
            ready: list[str] = []
            engine.fleet.on_replica_ready(lambda replica: ready.append(replica.id))
            fakes[0] = FakeVllm(port=int(fakes[0].url.rsplit(":", 1)[1]))
            await asyncio.sleep(0.5)
            assert ready == ["0"] and engine.fleet.replicas[0].restarts == 1
            reply = await engine.forward("/v1/completions", {"prompt": "x"}, _target(name), Outcome())
            assert reply.headers[REPLICA_HEADER] == "0"
        finally:
            await engine.close()

    try:
        asyncio.run(run())
    finally:
        for fake in fakes:
            fake.kill()


def test_a_replica_that_stops_answering_is_out_within_a_second_and_its_requests_move() -> None:
    fakes = [FakeVllm(), FakeVllm()]

    async def run() -> None:
        engine = _engine(*(f.url for f in fakes))
        await engine.open()
        try:
            name = next(n for n in ADAPTERS if engine.fleet.choose(_target(n)) is engine.fleet.replicas[0])
            fakes[0].hang.set()  # accepts connections, answers nothing: health checks time out
            started = time.monotonic()
            reply = await engine.forward("/v1/completions", {"prompt": "x"}, _target(name), Outcome())
            waited = time.monotonic() - started
            assert reply.status_code == 200 and reply.headers[REPLICA_HEADER] == "1"
            assert not engine.fleet.replicas[0].healthy
            assert waited < 2.5, f"the request waited {waited:.2f} s on a replica that stopped answering"
            # The last replica left is kept while it is only slow: its requests wait, as without a fleet.
            fakes[0].hang.clear()
            await asyncio.sleep(0.5)
            fakes[1].hang.set()
            fakes[0].kill()
            await asyncio.sleep(1.6)
            assert engine.fleet.replicas[1].healthy
            fakes[1].hang.clear()
            reply = await engine.forward("/v1/completions", {"prompt": "x"}, _target(name), Outcome())
            assert reply.headers[REPLICA_HEADER] == "1"
        finally:
            await engine.close()

    try:
        asyncio.run(run())
    finally:
        for fake in fakes:
            fake.kill()


def test_one_replica_works_as_before_the_fleet() -> None:
    fake = FakeVllm()

    async def run() -> None:
        engine = _engine(fake.url)
        await engine.open()
        try:
            report = engine.fleet.report()
            assert report["url"] == fake.url and report["status"] == "ready" and len(report["replicas"]) == 1
            for name in ("acme/a@1", "tiny"):
                target = _target(name) if name != "tiny" else Target("tiny", ENGINE_VLLM, "acme", True)
                reply = await engine.forward("/v1/completions", {"prompt": "x"}, target, Outcome())
                assert reply.status_code == 200 and reply.headers[REPLICA_HEADER] == "0"
            fake.kill()
            with pytest.raises(ApiError) as failed:  # nowhere else to go: 503 at once, as before
                await engine.forward("/v1/completions", {"prompt": "x"}, _target("acme/a@1"), Outcome())
            assert failed.value.status == 503 and engine.fleet.report()["status"] == "unreachable"
            with pytest.raises(ApiError) as failed:
                await engine.forward("/v1/completions", {"prompt": "x"}, _target("acme/a@1"), Outcome())
            assert failed.value.status == 503
        finally:
            await engine.close()

    try:
        asyncio.run(run())
    finally:
        fake.kill()


def test_warm_loads_an_adapter_on_its_k_replicas_and_metrics_correct_residency() -> None:
    fakes = [FakeVllm(), FakeVllm(), FakeVllm()]
    fakes[2].running = "globex/b@3"  # another gateway's adapter runs there

    async def run() -> None:
        engine = _engine(*(f.url for f in fakes))
        await engine.open()
        try:
            where = await engine.fleet.warm("acme/pinned@2", 2)
            assert len(where) == 2
            warmed = [f for f in fakes if any(p["model"] == "acme/pinned@2" for p in f.posts)]
            assert len(warmed) == 2 and all(p["max_tokens"] == 1 for f in warmed for p in f.posts)
            assert await engine.fleet.warm("acme/pinned@2", 2) == where  # resident: nothing sent again
            assert sum(len(f.posts) for f in fakes) == 2
            assert engine.fleet.replicas[2].holds("globex/b@3")
            report = engine.fleet.report()
            assert report["ready"] == 3 and {r["id"] for r in report["replicas"]} == {"0", "1", "2"}
        finally:
            await engine.close()

    try:
        asyncio.run(run())
    finally:
        for fake in fakes:
            fake.kill()


# -- the start-up check ------------------------------------------------------------------------------


def test_a_vllm_url_that_is_not_vllm_or_serves_another_base_is_refused_at_start(
    base_model: Path, tmp_path: Path
) -> None:
    plain = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    other = FakeVllm(served="some-other-base")
    env = {"ADAPTERDECK_HOME": str(tmp_path / "home")}
    try:
        for url, why in (
            (f"http://127.0.0.1:{plain.server_address[1]}", "not a vLLM server"),
            (other.url, "it serves /x, some-other-base, not the base tiny"),
        ):
            result = run_cli(
                "serve", "--base", str(base_model), "--served-name", "tiny", "--port", str(free_port()),
                "--vllm-url", url, "--workers", "0", env=env,
            )  # fmt: skip
            assert result.returncode == 2, result.stdout + result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and f"--vllm-url {url} is refused" in lines[0] and why in lines[0], lines
    finally:
        plain.shutdown()
        plain.server_close()
        other.kill()


# -- two real vLLM replicas (`serve --replicas 2`) ---------------------------------------------------


@dataclass
class Fleet2:
    process: ServeProcess
    url: str
    keys: dict[str, str]
    adapters: dict[str, str]  # ref -> the id of the replica it is placed on

    def health(self) -> dict[str, Any]:
        admin = {"Authorization": f"Bearer {self.keys['admin']}"}
        return httpx.get(f"{self.url}/health", headers=admin, timeout=10).json()

    def replicas(self) -> list[dict[str, Any]]:
        return self.health()["engines"]["vllm"]["replicas"]

    def ask(self, client: httpx.Client, ref: str) -> httpx.Response:
        body = {"model": ref, "prompt": "Hello there", "max_tokens": 4}
        return client.post(f"{self.url}/v1/completions", json=body, headers=self.auth())

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys['acme']}"}


def _two_free_ports() -> int:
    while True:
        port = free_port()
        if port < 65000 and not port_taken(port + 1):
            return port


def _wait(predicate: Any, timeout: float, what: str, process: ServeProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, KeyError, ValueError, IndexError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout} s; log:\n{process.tail()}")


@pytest.fixture(scope="module")
def fleet2(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet2]:
    root = tmp_path_factory.mktemp("fleet")
    home = root / "home"
    registry = Registry(RegistrySettings(home=home))
    vllm_port, port = _two_free_ports(), free_port()
    urls = [f"http://127.0.0.1:{vllm_port + i}" for i in range(2)]
    stand_ins = [Stand(u) for u in urls]
    # Three adapters placed on each replica (the placement follows from the replicas' URLs).
    adapters: dict[str, str] = {}
    for i in range(100):
        ref, first = f"acme/f{i}@1", ranked(f"acme/f{i}@1", stand_ins)[0]
        replica = str(stand_ins.index(first))
        if sum(r == replica for r in adapters.values()) < 3:
            adapters[ref] = replica
            registry.publish(make_lora(base_model, root / f"lora{i}", seed=i), ref.removesuffix("@1"))
        if len(adapters) == 6:
            break
    keys = {"acme": create_key(registry, "acme"), "admin": create_key(registry, None)}
    registry.close()
    config = root / "serve.yaml"
    vllm = {"max_loras": 2, "max_cpu_loras": 4, "max_lora_rank": 16, "extra_args": ["--enforce-eager"]}
    config.write_text(json.dumps({"vllm": vllm}))
    args = [
        "--base", base_model, "--port", str(port), "--vllm-port", str(vllm_port), "--replicas", "2",
        "--max-model-len", "512", "--served-name", "tiny", "--dtype", "float32", "--workers", "0",
        "--config", config,
    ]  # fmt: skip
    env = {"ADAPTERDECK_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": "1"}
    process = launch("serve", args, env, root / "serve.log")
    serving = Fleet2(process, f"http://127.0.0.1:{port}", keys, adapters)
    try:
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        both = lambda reply: reply.json()["engines"]["vllm"]["ready"] == 2  # noqa: E731
        wait_ready(process, serving.url, both, timeout=900, interval=1, request_timeout=5, headers=admin)
        yield serving
    finally:
        process.stop(timeout=90)


@pytest.mark.vllm
def test_two_replicas_each_on_its_core_and_each_adapter_on_its_replica(fleet2: Fleet2) -> None:
    replicas = fleet2.replicas()
    assert [r["id"] for r in replicas] == ["0", "1"] and all(r["status"] == "ready" for r in replicas)
    cores = sorted(os.sched_getaffinity(0))
    for r in replicas:  # each vLLM was started bound to its own share of the cores
        environ = Path(f"/proc/{r['pid']}/environ").read_bytes().split(b"\0")
        binding = [v for v in environ if v.startswith(b"VLLM_CPU_OMP_THREADS_BIND=")]
        expected = placement_env(int(r["id"]), 2, cores, [])["VLLM_CPU_OMP_THREADS_BIND"]
        assert binding == [f"VLLM_CPU_OMP_THREADS_BIND={expected}".encode()], binding
    with httpx.Client(timeout=120) as client:
        for ref, replica in fleet2.adapters.items():
            served = set()
            for _ in range(3):
                reply = fleet2.ask(client, ref)
                assert reply.status_code == 200, reply.text
                served.add(reply.headers[REPLICA_HEADER])
            assert served == {replica}, (ref, served)
        base = client.post(
            f"{fleet2.url}/v1/completions",
            json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
            headers=fleet2.auth(),
        )
        assert base.status_code == 200 and base.headers[REPLICA_HEADER] in {"0", "1"}
    resident = {r["id"]: set(r["resident"]) for r in fleet2.replicas()}
    for ref, replica in fleet2.adapters.items():
        assert ref in resident[replica] and ref not in resident[str(1 - int(replica))]
    metrics = httpx.get(
        f"{fleet2.url}/metrics", headers={"Authorization": f"Bearer {fleet2.keys['admin']}"}
    ).text
    assert 'adapterdeck_replica_adapter_loads_total{replica="1"} 3.0' in metrics, metrics
    assert 'adapterdeck_replica_up{replica="0"} 1.0' in metrics


@pytest.mark.vllm
def test_a_killed_replica_costs_no_request_and_gets_its_share_back(fleet2: Fleet2) -> None:
    outcomes: list[tuple[float, float, str, int, str]] = []  # (started, ended, ref, status, replica)
    stop = threading.Event()
    refs = list(fleet2.adapters)

    def load(offset: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = offset
            while not stop.is_set():
                ref, started = refs[i % len(refs)], time.monotonic()
                i += 1
                try:
                    reply = fleet2.ask(client, ref)
                    status, replica = reply.status_code, reply.headers.get(REPLICA_HEADER, "")
                except httpx.HTTPError as exc:
                    status, replica = -1, type(exc).__name__
                outcomes.append((started, time.monotonic(), ref, status, replica))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        victim = fleet2.replicas()[1]
        killed = time.monotonic()
        os.killpg(victim["pid"], signal.SIGKILL)
        while fleet2.replicas()[1]["status"] == "ready" and time.monotonic() - killed < 10:
            time.sleep(0.05)
        out_after = time.monotonic() - killed
        _wait(
            lambda: fleet2.replicas()[1]["status"] == "ready" and fleet2.replicas()[1]["restarts"] == 1,
            900, "the killed replica restarted", fleet2.process,
        )  # fmt: skip
        back = time.monotonic()
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    failures = [o for o in outcomes if o[3] != 200]
    assert failures == [], failures[:10]  # not one non-streamed request failed
    # Service on the other replica: the dead one's adapters, asked after the kill, answered there.
    takeover = min(
        (end - killed for start, end, ref, _, replica in outcomes
         if start > killed and fleet2.adapters[ref] == "1" and replica == "0"),
        default=None,
    )  # fmt: skip
    assert takeover is not None, "the dead replica's adapters were not served by the other one"
    held = max((end - start for start, end, *_ in outcomes if start < killed < end), default=0.0)
    print(
        f"\nreplica killed under load: out of /health after {out_after:.2f} s, its adapters answered "
        f"by the other {takeover:.2f} s after the kill; the requests in flight then took up to "
        f"{held:.2f} s (retried); {len(outcomes)} requests, none failed"
    )
    assert out_after < 5, f"the dead replica was taken out only after {out_after:.1f} s (goal: 1 s)"
    assert takeover < 5, f"the other replica took over only {takeover:.1f} s after the kill (goal: 1 s)"
    # Back: its share is its own again. Under load, a fresh replica loading its adapters holds
    # more in flight, and the bounded load sends some of them to the other for a while.
    after = [replica == fleet2.adapters[ref] for start, _, ref, _, replica in outcomes if start > back]
    print(f"after the restart, under load: {sum(after)} of {len(after)} requests on their own replica")
    with httpx.Client(timeout=120) as client:
        for ref, replica in fleet2.adapters.items():
            for _ in range(2):
                reply = fleet2.ask(client, ref)
                assert reply.status_code == 200, reply.text
                assert reply.headers[REPLICA_HEADER] == replica, (ref, dict(reply.headers))


def test_the_baseline_policies_ignore_adapters() -> None:
    """``fleet.policy`` round_robin and least_loaded (what affinity is benchmarked against)."""
    replicas = stands(3)
    replicas[0].resident.add(ADAPTERS[0])
    turns = Router(FleetSettings(policy="round_robin"))
    chosen = [turns.choose(ADAPTERS[0], replicas, 0.0) for _ in range(6)]
    assert Counter(r.url for r in chosen if r is not None) == Counter({r.url: 2 for r in replicas})
    least = Router(FleetSettings(policy="least_loaded"))
    replicas[0].in_flight, replicas[1].in_flight, replicas[2].in_flight = 5, 1, 3
    assert least.choose(ADAPTERS[0], replicas, 0.0) is replicas[1]
    assert FleetSettings().policy == "affinity"
