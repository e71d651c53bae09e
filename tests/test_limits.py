"""Per-tenant limits counted in each gateway's memory or, shared by several gateways, in Redis.

Two ``Limiter`` objects stand for two gateways (and a child process for one that dies); they talk
to the real Redis at 127.0.0.1:6379, each test under a key prefix of its own that it removes
afterwards. An outage is made with a TCP hop in front of Redis that can be cut or silenced. The
last test starts two real gateways in front of the session's vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.experiments import Experiments
from adapterdeck.registry.tenants import create_key
from adapterdeck.serve.errors import ApiError
from adapterdeck.serve.limits import Limiter, then
from adapterdeck.serve.settings import LimitSettings, LimitStorage, load_serve_settings

from .conftest import free_port
from .gateway_helpers import start_gateway
from .registry_helpers import claim_vllm, make_lora

REDIS = "redis://127.0.0.1:6379/0"
T = TypeVar("T")


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"test-limits-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(REDIS)
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def keys_under(prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(REDIS)
    try:
        return list(client.scan_iter(f"{prefix}:*"))
    finally:
        client.close()


def limiter(prefix: str, url: str = REDIS, **limits: int) -> Limiter:
    storage = LimitStorage(url=url, key_prefix=prefix, lease_seconds=1.5)
    return Limiter(LimitSettings(**limits), {}, storage)


async def refusal(call: Awaitable[object]) -> ApiError:
    with pytest.raises(ApiError) as refused:
        await call
    return refused.value


async def passes(call: Callable[[], Awaitable[T]], seconds: float) -> T:
    """``call()``'s answer as soon as it stops being refused, within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call()
        except ApiError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# -- shared through Redis ------------------------------------------------------------------------


def test_two_gateways_sharing_redis_enforce_one_per_minute_budget(prefix: str) -> None:
    async def scenario() -> None:
        a, b = limiter(prefix, requests_per_minute=5), limiter(prefix, requests_per_minute=5)
        for gateway in (a, b, a, b, a):
            await gateway.check("acme")
        for gateway in (a, b):  # the sixth request is refused by either
            over = await refusal(gateway.check("acme"))
            assert over.status == 429 and "5 requests per minute" in over.message
            assert over.headers is not None and 1 <= int(over.headers["Retry-After"]) <= 60
        await b.check("globex")  # another tenant has a budget of its own
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_two_gateways_sharing_redis_enforce_one_concurrency_cap(prefix: str) -> None:
    async def stream() -> AsyncIterator[int]:
        yield 1

    async def scenario() -> None:
        a, b = limiter(prefix, concurrent_requests=2), limiter(prefix, concurrent_requests=2)
        async with a.slot("acme") as defer:
            body = then(stream(), defer())  # a stream on gateway a keeps its slot
        async with b.slot("acme"):
            for gateway in (a, b):
                refused = await refusal(gateway.take("acme"))
                assert refused.status == 429 and "at most 2 at a time" in refused.message
            assert a.in_flight["acme"] == 1 and b.in_flight["acme"] == 1
        # b's slot is back: a takes it; the stream's slot comes back when the stream ends.
        release = await a.take("acme")
        await refusal(b.take("acme"))
        assert [item async for item in body] == [1]
        await (await b.take("acme"))()
        await release()
        assert keys_under(prefix) == [] or all(b"window" in k for k in keys_under(prefix))
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_with_memory_storage_each_gateway_counts_alone() -> None:
    async def scenario() -> None:
        a, b = (
            Limiter(LimitSettings(requests_per_minute=2, concurrent_requests=1), {}, LimitStorage())
            for _ in range(2)
        )
        for gateway in (a, b):  # each gateway allows the whole budget on its own
            await gateway.check("acme")
            await gateway.check("acme")
            assert (await refusal(gateway.check("acme"))).status == 429
        held = [await a.take("acme"), await b.take("acme")]
        assert (await refusal(a.take("acme"))).status == 429
        for release in held:
            await release()

    asyncio.run(scenario())


DEAD_GATEWAY = """
import asyncio, sys
from adapterdeck.serve.limits import Limiter
from adapterdeck.serve.settings import LimitSettings, LimitStorage

async def main():
    storage = LimitStorage(url=sys.argv[1], key_prefix=sys.argv[2], lease_seconds=float(sys.argv[3]))
    limiter = Limiter(LimitSettings(concurrent_requests=2), {}, storage)
    await limiter.take("acme")
    await limiter.take("acme")
    print("held", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_slots_of_a_gateway_that_died_come_back_after_the_lease(prefix: str) -> None:
    lease = 1.5
    child = subprocess.Popen(
        [sys.executable, "-c", DEAD_GATEWAY, REDIS, prefix, str(lease)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"

        async def alive_then_dead() -> float:
            other = limiter(prefix, concurrent_requests=2)
            await asyncio.sleep(lease * 2.5)  # the living gateway renews its leases
            assert (await refusal(other.take("acme"))).status == 429
            child.kill()
            child.wait()
            died = time.monotonic()
            releases = [await passes(lambda: other.take("acme"), lease + 5), await other.take("acme")]
            back = time.monotonic() - died
            for release in releases:
                await release()
            await other.close()
            return back

        back = asyncio.run(alive_then_dead())
        assert back < lease + 5, f"the dead gateway's slots came back after {back:.1f} s (lease {lease} s)"
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


# -- Redis away ----------------------------------------------------------------------------------


class Hop:
    """A TCP hop to the real Redis: ``cut`` closes it (connections refused), ``silent`` accepts
    connections and never answers."""

    def __init__(self, silent: bool = False) -> None:
        self.silent, self.port = silent, free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        if self.silent:
            while await reader.read(65536):
                pass
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self.writers.add(up_writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_redis_going_away_leaves_each_gateway_enforcing_alone_and_is_logged_once(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "adapterdeck.serve")

    async def scenario() -> None:
        hop = Hop()
        await hop.open()
        a = limiter(prefix, hop.url, requests_per_minute=4, concurrent_requests=1)
        b = limiter(prefix, REDIS, requests_per_minute=4, concurrent_requests=1)
        await a.check("acme")  # shared: 1 of 4
        await b.check("acme")
        await b.check("acme")  # shared: 3 of 4 (a's own count: 1)
        await hop.cut()
        started = time.monotonic()
        for _ in range(3):  # a counts alone now: it has seen 1, so 3 more
            await a.check("acme")
        assert (await refusal(a.check("acme"))).status == 429
        release = await a.take("acme")
        assert (await refusal(a.take("acme"))).status == 429  # its own cap holds alone
        await release()
        assert time.monotonic() - started < 3, "requests waited on a Redis that is away"
        await b.check("acme")  # b still shares: 4 of 4 there
        assert (await refusal(b.check("acme"))).status == 429
        await hop.open()  # Redis is back for a: shared again once it is tried
        await asyncio.sleep(1.2)
        assert (await refusal(a.check("acme"))).status == 429
        await a.close()
        await b.close()
        await hop.cut()

    asyncio.run(scenario())
    down = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in caplog.records]
    assert "on_outage is local" in down[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_redis_that_never_answers_costs_a_request_one_timeout_at_most(prefix: str) -> None:
    async def scenario() -> list[float]:
        hop = Hop(silent=True)
        await hop.open()
        gateway = limiter(prefix, hop.url, requests_per_minute=100, concurrent_requests=10)
        took = []
        for _ in range(5):
            started = time.monotonic()
            await gateway.check("acme")
            await (await gateway.take("acme"))()
            took.append(time.monotonic() - started)
        await gateway.close()
        await hop.cut()
        return took

    took = asyncio.run(scenario())
    assert max(took) < 2, f"a request waited {max(took):.2f} s on a silent Redis (timeout 0.25 s)"
    assert sum(took) < 3, took  # after one failure Redis is not tried again for a while


def test_on_outage_refuse_answers_503_at_once(prefix: str) -> None:
    async def scenario() -> None:
        storage = LimitStorage(
            url=f"redis://127.0.0.1:{free_port()}/0", key_prefix=prefix, on_outage="refuse"
        )
        gateway = Limiter(LimitSettings(), {"acme": LimitSettings(requests_per_minute=5)}, storage)
        started = time.monotonic()
        refused = await refusal(gateway.check("acme"))
        assert refused.status == 503 and refused.code == "limits_unavailable"
        assert refused.headers == {"Retry-After": "1"}
        await gateway.check("globex")  # a tenant without limits needs no count: not refused
        await (await gateway.take("globex"))()
        assert time.monotonic() - started < 2
        await gateway.close()

    asyncio.run(scenario())


def test_the_storage_url_is_checked() -> None:
    settings = load_serve_settings(None, {"base": "b", "limits_storage.url": REDIS})
    assert settings.limits_storage.url == REDIS and settings.limits_storage.on_outage == "local"
    assert load_serve_settings(None, {"base": "b"}).limits_storage.url == "memory://"
    with pytest.raises(AdapterdeckError, match=r"limits_storage\.url: .*memory://, redis://"):
        load_serve_settings(None, {"base": "b", "limits_storage.url": "http://127.0.0.1:6379"})
    with pytest.raises(AdapterdeckError, match=r"limits_storage\.on_outage"):
        load_serve_settings(None, {"base": "b", "limits_storage.on_outage": "ignore"})


# -- two real gateways ---------------------------------------------------------------------------


SLOW_ENGINE = """
import asyncio, json, sys
from aiohttp import web

async def models(request):
    entry = {"id": sys.argv[2], "object": "model", "owned_by": "vllm", "root": sys.argv[2], "parent": None}
    return web.json_response({"object": "list", "data": [entry]})

async def chat(request):
    body = await request.json()
    choices = [{"index": 0, "delta": {}}]
    chunk = {"object": "chat.completion.chunk", "model": body["model"], "choices": choices}
    if not body.get("stream"):
        return web.json_response({"object": "chat.completion", "model": body["model"], "choices": []})
    reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await reply.prepare(request)
    for _ in range(10):
        await reply.write(b"data: " + json.dumps(chunk).encode() + b"\\n\\n")
        await asyncio.sleep(0.3)
    await reply.write(b"data: [DONE]\\n\\n")
    return reply

app = web.Application()
app.router.add_get("/v1/models", models)
app.router.add_get("/health", lambda request: web.Response())
app.router.add_get("/metrics", lambda request: web.Response(text="process_start_time_seconds 1.0\\n"))
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def test_a_stream_through_one_real_gateway_holds_the_slot_against_another(
    base_model: Path, tmp_path: Path, prefix: str
) -> None:
    """Two real gateways in front of a slow stand-in for vLLM (a stream of ten chunks over three
    seconds), so a stream is still running when the other gateway is asked."""
    port = free_port()
    engine = subprocess.Popen([sys.executable, "-c", SLOW_ENGINE, str(port), str(base_model)])
    home = tmp_path / "home"
    registry = Registry(RegistrySettings(home=home))
    key = create_key(registry, "initech")
    registry.close()
    config = {
        "tenant_limits": {"initech": {"concurrent_requests": 1}},
        "limits_storage": {"url": REDIS, "key_prefix": prefix},
    }
    gateways = []
    try:
        env = {"ADAPTERDECK_HOME": str(home)}
        for _ in range(2):
            gateways.append(start_gateway(base_model, f"http://127.0.0.1:{port}", env, tmp_path, config))
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": str(base_model), "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        url = [f"{gateway.url}/v1/chat/completions" for gateway in gateways]
        with httpx.stream("POST", url[0], json=body, headers=headers, timeout=60) as stream:
            assert stream.status_code == 200, stream.read()
            lines = stream.iter_lines()
            next(lines)
            assert [k for k in keys_under(prefix) if b":slots:initech" in k], "the stream holds no lease"
            refused = httpx.post(url[1], json={**body, "stream": False}, headers=headers, timeout=60)
            assert refused.status_code == 429 and "at most 1 at a time" in refused.text, refused.text
            assert sum(1 for line in lines if line.startswith("data:")) >= 9
        # The stream is over: its slot is back in Redis, and the other gateway serves.
        assert not [k for k in keys_under(prefix) if b":slots:" in k]
        reply = httpx.post(url[1], json={**body, "stream": False}, headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
    finally:
        for gateway in gateways:
            gateway.stop()
        engine.terminate()
        engine.wait()


@pytest.mark.vllm
def test_two_gateways_share_limits_through_redis_and_agree_on_experiments(
    base_model: Path, vllm_home: Path, vllm_server: str, tmp_path: Path, prefix: str
) -> None:
    registry = Registry(RegistrySettings(home=vllm_home))
    for i in range(2):
        lora = claim_vllm(make_lora(base_model, tmp_path / f"lora{i}", seed=90 + i), base_model)
        registry.publish(lora, "umbrella/shared")
    Experiments(registry).create("umbrella/shared", "v1", [("v2", 50)])
    keys = {tenant: create_key(registry, tenant) for tenant in ("umbrella", "hooli", "initech")}
    registry.close()
    config = {
        "tenant_limits": {"hooli": {"requests_per_minute": 6}, "initech": {"concurrent_requests": 1}},
        "limits_storage": {"url": REDIS, "key_prefix": prefix},
    }
    env = {"ADAPTERDECK_HOME": str(vllm_home)}
    gateways = [start_gateway(base_model, vllm_server, env, tmp_path, config) for _ in range(2)]
    base = str(base_model)

    def chat(n: int, tenant: str, model: str = base, **extra: object) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
        headers = {"Authorization": f"Bearer {keys[tenant]}"}
        return httpx.post(
            f"{gateways[n % 2].url}/v1/chat/completions", json=body, headers=headers, timeout=120
        )

    try:
        # One budget of 6 a minute, the requests alternating between the two gateways.
        statuses = [chat(n, "hooli").status_code for n in range(8)]
        assert statuses == [200] * 6 + [429] * 2, statuses
        for n in range(2):
            over = chat(n, "hooli")
            assert over.status_code == 429 and "6 requests per minute" in over.text
            assert 1 <= int(over.headers["retry-after"]) <= 60

        # One slot, held by a third party on the same Redis (as a third gateway would): both
        # gateways refuse until it is given back, then both serve.
        async def one_slot() -> None:
            third = limiter(prefix, concurrent_requests=1)
            headers = {"Authorization": f"Bearer {keys['initech']}"}
            body = {"model": base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            async with httpx.AsyncClient(timeout=120, headers=headers) as client:
                release = await third.take("initech")
                await asyncio.sleep(2)  # past its first lease: the third party renews it
                for gateway in gateways:
                    refused = await client.post(f"{gateway.url}/v1/chat/completions", json=body)
                    assert refused.status_code == 429 and "at most 1 at a time" in refused.text, refused.text
                    assert int(refused.headers["retry-after"]) >= 1
                await release()
                for gateway in gateways:
                    reply = await client.post(f"{gateway.url}/v1/chat/completions", json=body)
                    assert reply.status_code == 200, reply.text
            await third.close()

        asyncio.run(one_slot())

        # The same user gets the same variant from either gateway, and both variants are used.
        served: dict[str, set[str]] = {}
        for user in (f"user-{i}" for i in range(12)):
            for n in range(2):
                reply = chat(n, "umbrella", "umbrella/shared", user=user)
                assert reply.status_code == 200, reply.text
                served.setdefault(user, set()).add(reply.headers["x-adapterdeck-ref"])
        assert all(len(refs) == 1 for refs in served.values()), served
        assert set().union(*served.values()) == {"umbrella/shared@1", "umbrella/shared@2"}, served
    finally:
        for gateway in gateways:
            gateway.stop()
