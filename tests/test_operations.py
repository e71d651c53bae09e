"""Operating in front of paying tenants: limits, isolation, secrets, a database outage.

Real gateways (``adapterdeck serve --vllm-url``) in front of the session's real vLLM (CPU build),
real keys, a real SQLite registry, and for the outage a private PostgreSQL server started here
(so stopping it touches nothing else on the machine).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.tenants import create_key
from adapterdeck.serve.errors import ApiError

from .conftest import free_port
from .gateway_helpers import GatewayProcess
from .gateway_helpers import start_gateway as start_gateway_process
from .registry_helpers import claim_vllm, make_lora

pytestmark = pytest.mark.vllm


class Gateway(GatewayProcess):
    def call(self, key: str | None, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kw.pop("headers", {}))
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kw)

    def chat(self, key: str, model: str, **extra) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}
        return self.call(key, "POST", "/v1/chat/completions", json={**body, **extra})


def start_gateway(
    base: Path, vllm_url: str, env: dict[str, str], workdir: Path, config: dict | None = None
) -> Gateway:
    return start_gateway_process(base, vllm_url, env, workdir, config, cls=Gateway)


@dataclass
class Setup:
    base: Path
    home: Path
    vllm_url: str
    keys: dict[str, str]
    adapters: list[Path]
    root: Path


@pytest.fixture(scope="module")
def setup(
    base_model: Path, vllm_home: Path, vllm_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("ops")
    adapters = [
        claim_vllm(make_lora(base_model, root / f"lora{i}", seed=70 + i), base_model) for i in range(2)
    ]
    registry = Registry(RegistrySettings(home=vllm_home))
    registry.publish(adapters[0], "acme/ops")
    registry.publish(adapters[1], "globex/ops")
    keys = {
        "acme": create_key(registry, "acme"),
        "globex": create_key(registry, "globex"),
        "initech": create_key(registry, "initech"),
        "admin": create_key(registry, None),
    }
    registry.close()
    yield Setup(base_model, vllm_home, vllm_server, keys, adapters, root)


@pytest.fixture(scope="module")
def gateway(setup: Setup) -> Iterator[Gateway]:
    config = {
        "tenant_limits": {"globex": {"requests_per_minute": 5}, "initech": {"concurrent_requests": 1}},
        "max_body_bytes": 64 * 1024,
        "max_tokens": 256,
    }
    gw = start_gateway(setup.base, setup.vllm_url, {"ADAPTERDECK_HOME": str(setup.home)}, setup.root, config)
    yield gw
    gw.stop()


# -- limits -------------------------------------------------------------------------------------


def test_oversize_bodies_and_unbounded_requests_are_refused(setup: Setup, gateway: Gateway) -> None:
    key = setup.keys["acme"]
    big = gateway.chat(key, "acme/ops", messages=[{"role": "user", "content": "x" * 100_000}])
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    # Without a Content-Length (chunked), the limit holds while the body streams in.
    chunks = (
        b'{"model": "acme/ops", "messages": [{"role": "user", "content": "' + b"y" * 8192 for _ in range(16)
    )
    chunked = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=chunks,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert chunked.status_code == 413
    for extra, param in (
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"n": 10_000}, "n"),
        ({"stream": "yes"}, "stream"),
    ):
        reply = gateway.chat(key, "acme/ops", **extra)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (extra, reply.text)
    assert gateway.chat(key, "acme/ops", max_tokens=256).status_code == 200


def test_rate_limits_answer_429_with_retry_after(setup: Setup, gateway: Gateway) -> None:
    key = setup.keys["globex"]  # five requests per minute
    assert [gateway.chat(key, "globex/ops").status_code for _ in range(5)] == [200] * 5
    over = gateway.chat(key, "globex/ops")
    assert over.status_code == 429 and "5 requests per minute" in over.json()["error"]["message"]
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(over.headers["retry-after"]) <= 60
    # Other tenants have no limit; their requests are not slowed by globex's.
    assert all(gateway.chat(setup.keys["acme"], "acme/ops").status_code == 200 for _ in range(8))


def test_concurrent_requests_over_the_quota_get_429(setup: Setup, gateway: Gateway) -> None:
    key = setup.keys["initech"]  # one request at a time
    for _ in range(3):  # the requests must overlap: 8 long ones sent at the same moment
        start = threading.Barrier(8)

        def one(_: int, start: threading.Barrier = start) -> httpx.Response:
            start.wait()
            return gateway.chat(key, str(setup.base), max_tokens=256, ignore_eos=True)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(one, range(8)))
        statuses = [r.status_code for r in replies]
        if 429 in statuses:
            break
    assert set(statuses) == {200, 429}, statuses
    refused = next(r for r in replies if r.status_code == 429)
    assert "at most 1 at a time" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    # The slot is given back: one at a time always works.
    assert [gateway.chat(key, str(setup.base)).status_code for _ in range(3)] == [200] * 3


def test_the_limiter_holds_a_slot_until_the_stream_ends() -> None:
    import asyncio

    from adapterdeck.serve.limits import Limiter, then
    from adapterdeck.serve.settings import LimitSettings

    limiter = Limiter(LimitSettings(), {"t": LimitSettings(concurrent_requests=2)})

    async def stream() -> AsyncIterator[int]:
        yield 1
        yield 2

    async def scenario() -> None:
        async with limiter.slot("t") as defer:
            body = then(stream(), defer())  # a streamed answer keeps its slot after the handler
        async with limiter.slot("t"):
            with pytest.raises(ApiError) as refused:
                async with limiter.slot("t"):
                    pass
            assert refused.value.status == 429
        assert [item async for item in body] == [1, 2]
        assert limiter.in_flight["t"] == 0
        async with limiter.slot("u"):  # no limit for others
            assert limiter.in_flight["u"] == 1

    asyncio.run(scenario())


# -- isolation -----------------------------------------------------------------------------------


HI = [{"role": "user", "content": "hi"}]
EXPERIMENT = {"name": "globex/ops", "control": "v1", "candidates": [{"ref": "base", "weight": 10}]}

# Every route of the gateway, called by acme (a tenant; globex/ops is another tenant's adapter)
# and by the admin: (method, path, JSON body, acme's status, admin's status). Without a key, or
# with a wrong one, every route but /health answers 401. Run in this order (some change state).
MATRIX: list[tuple[str, str, dict | None, int, int]] = [
    ("GET", "/v1/models", None, 200, 200),
    ("POST", "/v1/chat/completions", {"model": "acme/ops", "messages": HI, "max_tokens": 2}, 200, 200),
    ("POST", "/v1/chat/completions", {"model": "globex/ops", "messages": HI, "max_tokens": 2}, 404, 200),
    ("POST", "/v1/completions", {"model": "acme/ops", "prompt": "hi", "max_tokens": 2}, 200, 200),
    ("POST", "/v1/completions", {"model": "globex/ops", "prompt": "hi", "max_tokens": 2}, 404, 200),
    ("GET", "/v1/adapters", None, 200, 200),
    ("GET", "/v1/adapters/acme/ops", None, 200, 200),
    ("GET", "/v1/adapters/globex/ops", None, 404, 200),
    ("GET", "/v1/adapters/acme/ops/versions/1", None, 200, 200),
    ("GET", "/v1/adapters/globex/ops/versions/1", None, 404, 200),
    ("GET", "/v1/adapters/globex/ops/versions/1/report", None, 404, 404),  # admin: published without one
    ("POST", "/v1/adapters/acme/ops/versions", None, 403, 400),  # admin: no files sent
    ("PUT", "/v1/adapters/acme/ops/aliases/prod", {"version": 1}, 403, 200),
    ("PUT", "/v1/pins/acme/ops/prod", {"replicas": 1}, 403, 200),
    ("GET", "/v1/pins", None, 200, 200),
    ("DELETE", "/v1/pins/acme/ops/prod", None, 403, 200),
    ("GET", "/v1/experiments", None, 200, 200),
    ("POST", "/v1/experiments", EXPERIMENT, 404, 201),
    ("GET", "/v1/experiments/globex/ops", None, 404, 200),
    ("POST", "/v1/experiments/globex/ops/weights", {"variant": "base", "weight": 5}, 404, 200),
    ("POST", "/v1/experiments/globex/ops/promote", {"variant": "base"}, 404, 400),  # base: not promotable
    ("POST", "/v1/experiments/globex/ops/stop", None, 404, 200),
    ("GET", "/v1/experiments/acme/ops", None, 404, 404),  # none exists
    ("POST", "/v1/feedback", {"response_id": "chatcmpl-unknown", "thumbs": "up"}, 404, 404),
    ("GET", "/v1/files", None, 200, 200),
    ("POST", "/v1/files", None, 400, 403),  # acme: no file sent; admin: files are a tenant's
    ("GET", "/v1/files/file-unknown", None, 404, 404),
    ("DELETE", "/v1/files/file-unknown", None, 404, 404),
    ("GET", "/v1/files/file-unknown/content", None, 404, 404),
    ("GET", "/v1/fine_tuning/jobs", None, 200, 200),
    ("POST", "/v1/fine_tuning/jobs", {"model": "x", "training_file": "file-unknown"}, 404, 403),  # a tenant's
    ("GET", "/v1/fine_tuning/jobs/ftjob-unknown", None, 404, 404),
    ("POST", "/v1/fine_tuning/jobs/ftjob-unknown/cancel", None, 404, 404),
    ("GET", "/v1/fine_tuning/jobs/ftjob-unknown/events", None, 404, 404),
    ("GET", "/v1/fine_tuning/jobs/ftjob-unknown/checkpoints", None, 404, 404),
    ("GET", "/metrics", None, 200, 200),
]


def _template(path: str) -> str:
    path = re.sub(r"/(acme|globex)/ops", "/{t}/{n}", path).replace("/prod", "/{a}")
    path = re.sub(r"(file|ftjob)-unknown", "{id}", path)
    path = re.sub(r"/versions/\d+", "/versions/{v}", path)
    return re.sub(r"\{[^}]+\}", "{x}", path)


def test_the_isolation_matrix(setup: Setup, gateway: Gateway) -> None:
    # The matrix covers every route the gateway has (but /health, open to all).
    spec = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()
    declared = {(m.upper(), _template(p)) for p, ops in spec["paths"].items() for m in ops if p != "/health"}
    assert declared == {(m, _template(p)) for m, p, *_ in MATRIX}
    failures = []
    for method, path, body, acme, admin in MATRIX:
        for who, expected in (("none", 401), ("bad", 401), ("acme", acme), ("admin", admin)):
            key = {"none": None, "bad": "adk_not-a-real-key"}.get(who, setup.keys.get(who))
            reply = gateway.call(key, method, path, json=body)
            if reply.status_code != expected:
                failures.append(
                    f"{method} {path} as {who}: {reply.status_code} {reply.text[:200]}, expected {expected}"
                )
            if reply.status_code >= 400:
                assert reply.json()["error"]["message"], (method, path, who)
            for secret in setup.keys.values():  # no key ever comes back, not even the caller's
                assert secret not in reply.text
            if who == "acme" and reply.status_code < 300:
                assert "globex" not in reply.text, f"{method} {path} shows globex's names to acme"
    assert not failures, "\n".join(failures)
    # The admin sees every tenant's series; keys never reach the log.
    assert "globex/ops" in gateway.call(setup.keys["admin"], "GET", "/metrics").text
    log = gateway.log.read_text()
    assert not any(secret in log for secret in setup.keys.values())


def test_the_vllm_port_is_bound_to_loopback(setup: Setup, gateway: Gateway) -> None:
    # vLLM as the gateway starts it listens on 127.0.0.1 only (checked on the command it is given
    # here; the running process's socket in tests/test_serve.py::test_metrics_and_health).
    from adapterdeck.serve.engines.process import VllmSupervisor
    from adapterdeck.serve.settings import ServeSettings

    command = VllmSupervisor(ServeSettings(base=str(setup.base)), {}, setup.root / "x.log").command()
    assert command[command.index("--host") + 1] == "127.0.0.1"


# -- a database outage ------------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL server of our own (initdb in a temporary directory, a free port)."""

    def __init__(self) -> None:
        self.bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="adapterdeck-pg-"))
        self.port = free_port()
        shutil.chown(self.dir, "postgres")
        self._as_postgres(self.bin / "initdb", "-D", self.dir / "data", "-A", "trust", "-U", "postgres")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd: str | Path) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, cmd)], check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._as_postgres(
            self.bin / "pg_ctl", "-D", self.dir / "data", "-o", options, "-l", self.dir / "log", "-w", "start"
        )

    def stop(self) -> None:
        self._as_postgres(self.bin / "pg_ctl", "-D", self.dir / "data", "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    if os.geteuid() != 0 or not Path("/usr/lib/postgresql").exists():
        pytest.skip("needs root and PostgreSQL's server binaries to run a private PostgreSQL")
    pg = PrivatePostgres()
    pg.start()
    yield pg
    pg.remove()


def test_a_database_outage_keeps_resolved_adapters_serving(
    setup: Setup, postgres: PrivatePostgres, tmp_path: Path
) -> None:
    # The gateway's registry lives in the private PostgreSQL. The session's vLLM reads its own
    # registry (the shared SQLite one), where the same adapter is published under the same ref.
    registry = Registry(RegistrySettings(home=tmp_path / "home", database_url=postgres.url))
    assert registry.publish(setup.adapters[0], "acme/ops").ref == "acme/ops@1"
    key = create_key(registry, "acme")
    admin = create_key(registry, None)  # /health's details are the admin key's
    registry.close()
    env = {"ADAPTERDECK_HOME": str(tmp_path / "home"), "ADAPTERDECK_DATABASE_URL": postgres.url}
    gw = start_gateway(setup.base, setup.vllm_url, env, tmp_path)
    try:
        assert gw.chat(key, "acme/ops").json()["model"] == "acme/ops@1"
        assert gw.call(admin, "GET", "/health").json()["database"] == "ok"
        postgres.stop()
        started = time.monotonic()
        health = gw.call(admin, "GET", "/health")
        assert health.status_code == 503 and health.json()["database"] == "unreachable"
        # What the gateway resolved before keeps serving; nothing new can be looked up.
        for _ in range(3):
            reply = gw.chat(key, "acme/ops")
            assert reply.status_code == 200 and reply.json()["model"] == "acme/ops@1"
        unknown = gw.chat(key, "acme/never-seen")
        assert unknown.status_code == 503 and "database" in unknown.json()["error"]["message"]
        assert time.monotonic() - started < 30  # nothing hangs on the dead database
        postgres.start()
        deadline = time.monotonic() + 30
        while gw.call(admin, "GET", "/health").json()["database"] != "ok":
            assert time.monotonic() < deadline, "the gateway did not notice the database came back"
            time.sleep(0.5)
        assert gw.chat(key, "acme/never-seen").status_code == 404  # lookups work again
    finally:
        gw.stop()
