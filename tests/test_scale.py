"""Thousands of adapters: a registry of 10,000 versions (bulk-filled from one published version),
``/v1/models`` and ``/v1/adapters`` page by page with a constant number of queries (counted, not
timed), the adapter cache on disk within its bound while hundreds of distinct adapters go through
vLLM's resolver, and the gateway's in-memory caches within theirs.

Queries are counted with a SQLAlchemy event listener on the registry's engine, in-process, against
the app's routes; the app is driven without its lifespan (no engine is started: listing needs
none). One test lists through a real gateway process in front of the session's vLLM.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from adapterdeck.registry import Registry, RegistrySettings
from adapterdeck.registry.cache import AdapterCache, Lru
from adapterdeck.registry.catalog import model_names
from adapterdeck.registry.tenants import Principal, create_key

from .gateway_helpers import start_gateway
from .registry_helpers import bulk_fill, claim_vllm, make_lora, postgres_database

TENANTS, ADAPTERS, VERSIONS = 100, 10, 10  # 10,000 versions
PROD, STAGING = 8, 10


def layout() -> list[str]:
    return [f"tenant-{t:03d}/adapter-{a:02d}" for t in range(TENANTS) for a in range(ADAPTERS)]


def aliases() -> list[tuple[str, str, int]]:
    wanted = []
    for index, adapter in enumerate(layout()):
        if index % 10 != 9:  # each tenth adapter has no prod
            wanted.append((adapter, "prod", PROD))
        wanted.append((adapter, "staging", STAGING))
    return wanted


def expected_names(tenant: str | None = None) -> list[str]:
    """Every name the catalog lists, in its order (tenant, adapter, bare, @N, :alias)."""
    pointing: dict[str, list[str]] = {}
    for adapter, alias, _ in aliases():
        pointing.setdefault(adapter, []).append(alias)
    names = []
    for adapter in layout():
        if tenant is None or adapter.startswith(f"{tenant}/"):
            names.append(adapter)
            names += [f"{adapter}@{v}" for v in range(1, VERSIONS + 1)]
            names += [f"{adapter}:{a}" for a in sorted(pointing[adapter])]
    return names


@dataclass
class Big:
    """A registry of 10,000 versions and its parts."""

    registry: Registry
    base: Path
    template_size: int


def fill(settings: RegistrySettings, base: Path, adapter_dir: Path) -> Big:
    registry = Registry(settings)
    first = layout()[0]
    info = registry.publish(adapter_dir, first)
    bulk_fill(registry, layout(), VERSIONS, f"{first}@1", aliases())
    assert registry.count_versions() == TENANTS * ADAPTERS * VERSIONS
    return Big(registry, base, info.size_bytes)


@pytest.fixture(scope="module")
def lora(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return claim_vllm(make_lora(base_model, tmp_path_factory.mktemp("lora") / "lora"), base_model)


@pytest.fixture(scope="module")
def big(base_model: Path, lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Big]:
    """SQLite, 10,000 versions."""
    home = tmp_path_factory.mktemp("big-sqlite")
    made = fill(RegistrySettings(home=home), base_model, lora)
    yield made
    made.registry.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(
    request: pytest.FixtureRequest, base_model: Path, lora: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Big]:
    """The same 10,000 versions on each database."""
    if request.param == "sqlite":
        yield request.getfixturevalue("big")
        return
    home = tmp_path_factory.mktemp("big-postgresql")
    with postgres_database() as url:
        made = fill(RegistrySettings(home=home, database_url=url), base_model, lora)
        try:
            yield made
        finally:
            made.registry.close()


@contextmanager
def counted(engine: Engine) -> Iterator[list[str]]:
    """The statements run on ``engine`` meanwhile (transaction control left out)."""
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA")):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", seen)


def in_process(big: Big) -> TestClient:
    """The gateway's app without its lifespan: the routes and the keys, no engine."""
    from adapterdeck.serve.app import create_app
    from adapterdeck.serve.settings import ServeSettings

    settings = ServeSettings(base=str(big.base), vllm={"url": "http://127.0.0.1:9"})
    return TestClient(create_app(settings, big.registry))


def walk(get: Any, path: str, limit: int, key: str = "id") -> tuple[list[str], list[dict[str, Any]]]:
    """Every page of ``path``; the ids and the pages."""
    ids: list[str] = []
    pages: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        page = get(path, params)
        pages.append(page)
        assert len(page["data"]) <= limit
        ids += [item[key] for item in page["data"]]
        if not page["has_more"]:
            return ids, pages
        assert page["last_id"] == page["data"][-1][key]
        after = page["last_id"]
        assert len(pages) < 1000, "the pages never end"


# -- /v1/models and /v1/adapters -------------------------------------------------------------------


def test_models_are_listed_page_by_page_with_one_query_each(backend: Big) -> None:
    client = in_process(backend)
    admin = {"Authorization": f"Bearer {create_key(backend.registry, None)}"}
    base = backend.base.name
    assert (
        client.get("/v1/models", params={"limit": 1}, headers=admin).status_code == 200
    )  # the key is cached
    per_page: list[int] = []

    def get(path: str, params: dict[str, Any]) -> dict[str, Any]:
        with counted(backend.registry.engine) as statements:
            reply = client.get(path, params=params, headers=admin)
        assert reply.status_code == 200, reply.text
        per_page.append(len(statements))
        return reply.json()

    ids, pages = walk(get, "/v1/models", 1000)
    assert ids == [base, *expected_names()]  # the base first, every name once, in a stable order
    assert len(pages) == -(-len(ids) // 1000) >= 13
    assert pages[0]["object"] == "list" and pages[0]["data"][1]["owned_by"] == "tenant-000"
    assert per_page == [1] * len(pages), f"queries per page: {per_page}"

    # The default page is the largest; a page past the end is empty.
    assert len(client.get("/v1/models", headers=admin).json()["data"]) == 1000
    last = client.get("/v1/models", params={"after": ids[-1]}, headers=admin).json()
    assert last["data"] == [] and last["has_more"] is False and last["last_id"] is None
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": "not a model id"}):
        assert client.get("/v1/models", params=bad, headers=admin).status_code == 400

    per_page.clear()
    adapters, pages = walk(get, "/v1/adapters", 100, key="adapter")
    assert adapters == layout() and len(pages) == 10
    assert pages[0]["data"][0]["versions"] == list(range(1, VERSIONS + 1))
    assert pages[0]["data"][0]["aliases"] == {"prod": PROD, "staging": STAGING}
    assert max(per_page) <= 3, f"queries per page: {per_page}"


def test_a_tenant_pages_through_its_own_names_only(backend: Big) -> None:
    client = in_process(backend)
    tenant = "tenant-042"
    headers = {"Authorization": f"Bearer {create_key(backend.registry, tenant)}"}

    def get(path: str, params: dict[str, Any]) -> dict[str, Any]:
        reply = client.get(path, params=params, headers=headers)
        assert reply.status_code == 200, reply.text
        return reply.json()

    # Pages of 7 split adapters' names across pages; the walk still sees each name once.
    ids, _ = walk(get, "/v1/models", 7)
    assert ids == [backend.base.name, *expected_names(tenant)]
    assert {m["owned_by"] for m in get("/v1/models", {})["data"][1:]} == {tenant}
    # Another tenant's name as a cursor reveals nothing: it only says where to start.
    assert get("/v1/models", {"after": "tenant-099/adapter-00"})["data"] == []
    adapters, _ = walk(get, "/v1/adapters", 3, key="adapter")
    assert adapters == [a for a in layout() if a.startswith(f"{tenant}/")]


def test_the_registry_lists_in_pages_or_whole(big: Big) -> None:
    registry = big.registry
    everything = registry.list()
    assert [row["adapter"] for row in everything] == layout()
    page = registry.list("tenant-007", after="tenant-007/adapter-03", limit=4)
    assert [row["adapter"] for row in page] == [f"tenant-007/adapter-0{i}" for i in range(4, 8)]
    assert page[0] == next(row for row in everything if row["adapter"] == "tenant-007/adapter-04")
    with counted(registry.engine) as statements:
        rows = model_names(registry, None, after="tenant-050/adapter-05@3", limit=20).items
    assert len(statements) == 1
    start = expected_names().index("tenant-050/adapter-05@3") + 1
    assert [r.id for r in rows] == expected_names()[start : start + 20]


def test_fine_tuned_models_are_listed_after_their_tenants_adapters(
    base_model: Path, lora: Path, tmp_path: Path
) -> None:
    import adapterdeck.registry.schema as t
    from adapterdeck.registry.db import now, write_transaction

    registry = Registry(RegistrySettings(home=tmp_path / "home"))
    for adapter in ("acme/support", "beta/other"):
        registry.publish(lora, adapter)
    model = "ft:tiny:acme::abcd1234"
    with write_transaction(registry.engine) as conn:
        tenant_id = conn.execute(t.tenants.select().where(t.tenants.c.name == "acme")).one().id
        for job, status, name in (("ftjob-done", "succeeded", model), ("ftjob-busy", "running", None)):
            conn.execute(
                t.ft_jobs.insert().values(
                    id=job, tenant_id=tenant_id, status=status, model="tiny", base="tiny",
                    training_file="file-x", seed=0, hyperparameters={}, adapter_method={},
                    evaluators=[], fine_tuned_model=name, result_ref="acme/support@1",
                    result_files=[], max_attempts=2, created_at=now(), finished_at=now(),
                )
            )  # fmt: skip
        conn.execute(
            t.ft_checkpoints.insert().values(
                job_id="ftjob-done", step=5, metrics={}, name=f"{model}:ckpt-step-5",
                ref="acme/support@1", created_at=now(),
            )
        )  # fmt: skip
    names = [m.id for m in model_names(registry, None, after=None, limit=100).items]
    assert names == [
        "acme/support", "acme/support@1", model, f"{model}:ckpt-step-5", "beta/other", "beta/other@1",
    ]  # fmt: skip
    # A fine-tuned name is a cursor like any other.
    assert [m.id for m in model_names(registry, None, after=model, limit=1).items] == [f"{model}:ckpt-step-5"]
    assert [m.id for m in model_names(registry, "beta", after=None, limit=100).items] == names[4:]
    registry.close()


# -- the adapter cache on disk ----------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_disk_cache_stays_within_its_bound_through_the_resolver(
    big: Big, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """320 distinct adapters through vLLM's resolver (its code path, in-process), twice over, with
    room for 20 in the cache: never more than 20, each evicted one copied again when used again,
    and no file handle kept per adapter."""
    from adapterdeck.serve.engines.resolver import AdapterdeckResolver

    cache_dir = tmp_path / "cache"
    bound = 20 * big.template_size
    for name, value in big.registry.settings.child_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ADAPTERDECK_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ADAPTERDECK_CACHE_MAX_BYTES", str(bound))
    monkeypatch.setenv("ADAPTERDECK_CACHE_MIN_IDLE_SECONDS", "0")
    resolver = AdapterdeckResolver()
    cache = AdapterCache(big.registry.store, cache_dir, bound, 0)
    working_set = [f"{a}@{1 + i % VERSIONS}" for i, a in enumerate(layout()[::3][:320])]
    paths: dict[str, str] = {}
    fds: list[int] = []
    for round_ in range(2):
        for i, ref in enumerate(working_set):
            path = resolver.materialize(str(big.base), ref)
            assert path is not None and Path(path, "adapter_config.json").is_file(), ref
            assert paths.setdefault(ref, path) == path  # copied again to the same place
            used, count = cache.usage()
            assert used <= bound and count <= 20, f"{ref}: {count} adapters, {used} bytes (bound {bound})"
            if round_ == 0 and i == 20:
                fds.append(fd_count())
    fds.append(fd_count())
    assert len(set(paths.values())) == len(working_set)  # distinct adapters, distinct directories
    assert fds[-1] <= fds[0] + 2, f"open file descriptors grew with the adapters: {fds}"
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporary left over
    assert len(resolver._base_fingerprints) == 1  # the resolver's memory: one entry per base


def test_the_disk_cache_spares_what_is_in_use(big: Big, tmp_path: Path) -> None:
    """Adapters used within ``min_idle_seconds`` and copies in progress are never evicted, even
    above the bound; once idle, the least recently used go first; an evicted one is healed from
    its manifest blob alone."""
    refs = [f"tenant-001/adapter-0{i}@1" for i in range(10)]
    paths = [big.registry.materialize(big.registry.show(ref), tmp_path / "cache") for ref in refs]
    info = big.registry.show(refs[0])
    cache = AdapterCache(big.registry.store, tmp_path / "cache", 5 * big.template_size, 60)
    assert cache.usage()[1] == 10  # all in use: over the bound, none taken
    in_progress = cache.directory / f".{info.manifest_sha256}.x.tmp"
    in_progress.mkdir()
    old = time.time() - 3600 + 5  # idle, but not yet stale
    for age, path in enumerate(paths[:8]):
        os.utime(path, (old + age, old + age))
    os.utime(in_progress, (old, old))
    assert cache.evict() == 5
    assert sorted(p.name for p in cache.directory.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in paths[5:]
    )  # the five used longest ago went; the two in use stayed
    assert in_progress.is_dir()
    # vLLM reloads from the path it was given once: the path comes back, with the same files.
    gone = paths[0]
    assert not gone.exists() and cache.heal(gone) and (gone / "adapter_config.json").is_file()
    assert {p.name for p in gone.iterdir()} == {f["path"] for f in info.files}
    assert cache.heal(tmp_path / "elsewhere" / info.manifest_sha256) is False


def test_vllms_loader_restores_an_evicted_adapter_before_loading_it(
    big: Big, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM asks the resolver once per name, then reloads from the same path whenever it dropped
    the adapter: the resolver's plugin wraps that path lookup so an evicted directory comes back."""
    from vllm.lora import worker_manager

    from adapterdeck.serve.engines.resolver import AdapterdeckResolver, heal_before_loading

    for name, value in big.registry.settings.child_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ADAPTERDECK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(worker_manager, "get_adapter_absolute_path", worker_manager.get_adapter_absolute_path)
    resolver = AdapterdeckResolver()
    heal_before_loading(resolver)
    heal_before_loading(resolver)  # once only
    assert getattr(worker_manager.get_adapter_absolute_path, "adapterdeck_heals", False)
    path = resolver.materialize(str(big.base), "tenant-003/adapter-03@3")
    assert path is not None
    shutil.rmtree(path)  # evicted by another process
    assert worker_manager.get_adapter_absolute_path(path) == path
    assert Path(path, "adapter_config.json").is_file()
    assert worker_manager.get_adapter_absolute_path("/not/ours") == "/not/ours"  # left alone


# -- the gateway's memory ----------------------------------------------------------------------------


def test_lru_forgets_the_least_recently_used() -> None:
    lru: Lru[str, int] = Lru(3)
    for i, key in enumerate("abc"):
        lru[key] = i
    assert lru.get("a") == 0  # a is now the most recent
    lru["d"] = 3
    assert "b" not in lru and {"a", "c", "d"} == {k for k in "abcd" if k in lru} and len(lru) == 3


def test_the_gateways_caches_stay_within_their_bounds(big: Big, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of distinct names and keys through a gateway whose caches hold a few dozen: the
    caches never pass their bounds and keep the most recent entries (no wholesale clearing)."""
    from adapterdeck.serve import auth, gateway
    from adapterdeck.serve.settings import ServeSettings

    monkeypatch.setattr(gateway, "CACHED_VERSIONS", 50)
    monkeypatch.setattr(gateway, "REMEMBERED_VERSIONS", 80)
    monkeypatch.setattr(auth, "CACHED_KEYS", 30)
    settings = ServeSettings(base=str(big.base), vllm={"url": "http://127.0.0.1:9"})
    serving = gateway.Gateway(settings, big.registry, [])
    admin = Principal("admin", None, "adk_test")
    keys = [create_key(big.registry, f"tenant-{i:03d}") for i in range(100)]
    names = [f"{a}@{v}" for a in layout()[:150] for v in (1, 2)] + [f"{a}:staging" for a in layout()[:150]]

    async def run() -> None:
        for i, name in enumerate(names):
            target = await serving.route(name, admin)
            assert target.name.startswith(name.split(":")[0].split("@")[0] + "@")
            if i % 50 == 0:
                assert len(serving._versions) <= 50 and len(serving._last_versions.answers) <= 80
        for key in keys:
            await serving.keys.authenticate(key)
            assert len(serving.keys._cached) <= 30 and len(serving.keys._last.answers) <= 30

    asyncio.run(run())
    assert len(serving._versions) == 50 and len(serving._last_versions.answers) == 80
    assert names[299] in serving._versions  # the most recent immutable ref is kept
    assert keys[-1] in serving.keys._cached and keys[0] not in serving.keys._cached


def test_the_peft_engine_holds_a_bounded_number_of_adapters(
    big: Big, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterdeck.serve.engines.peft import PeftEngine
    from adapterdeck.serve.metrics import Metrics
    from adapterdeck.serve.settings import ServeSettings

    settings = ServeSettings(base=str(big.base), peft_max_adapters=3, vllm={"url": "http://127.0.0.1:9"})
    engine = PeftEngine(settings, big.registry, Metrics())
    refs = [f"tenant-005/adapter-0{i}@1" for i in range(6)]

    async def run() -> None:
        for ref in [*refs, refs[0]]:
            reply = await engine.complete("/v1/completions", {"prompt": "hi", "max_tokens": 1}, ref)
            assert reply["model"] == ref

    try:
        asyncio.run(run())
    finally:
        engine.close()
    assert list(engine.loaded) == [refs[4], refs[5], refs[0]]
    assert len(engine.model.peft_config) == 3


# -- a real gateway --------------------------------------------------------------------------------


@pytest.mark.vllm
def test_a_gateway_lists_ten_thousand_versions_page_by_page(
    big: Big, vllm_server: str, tmp_path: Path
) -> None:
    env = big.registry.settings.child_env()
    key = create_key(big.registry, None)
    gateway = start_gateway(big.base, vllm_server, env, tmp_path)
    try:
        client = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

        def get(path: str, params: dict[str, Any]) -> dict[str, Any]:
            reply = client.get(path, params=params)
            assert reply.status_code == 200, reply.text
            return reply.json()

        ids, pages = walk(get, "/v1/models", 1000)
        assert ids == [str(big.base), *expected_names()]
        assert all(p["object"] == "list" for p in pages)
        from openai import OpenAI

        first = OpenAI(base_url=f"{gateway.url}/v1", api_key=key).models.list()
        assert [m.id for m in first.data] == ids[:1000]
    finally:
        gateway.stop()


@pytest.mark.vllm
def test_vllm_reloads_an_adapter_evicted_from_the_disk_cache(
    lora: Path, base_model: Path, vllm_server: str, vllm_home: Path, tmp_path: Path
) -> None:
    """vLLM (4 adapters in its memory) drops the first of six adapters; its directory is evicted
    from the disk cache meanwhile (as another process's eviction would): the next request to it
    still succeeds, because vLLM's loader gets the directory back before it reads it."""
    registry = Registry(RegistrySettings(home=vllm_home))
    refs = [registry.publish(lora, f"scale/reload-{i}").ref for i in range(6)]
    key = create_key(registry, "scale")
    gateway = start_gateway(base_model, vllm_server, {"ADAPTERDECK_HOME": str(vllm_home)}, tmp_path)
    try:
        client = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

        def complete(ref: str) -> httpx.Response:
            return client.post("/v1/completions", json={"model": ref, "prompt": "hi", "max_tokens": 1})

        for ref in refs:
            assert complete(ref).status_code == 200, ref
        first = registry.settings.resolved_cache_dir() / registry.show(refs[0]).manifest_sha256
        assert (first / "adapter_config.json").is_file()
        shutil.rmtree(first)
        reply = complete(refs[0])
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == refs[0]
        assert (first / "adapter_config.json").is_file(), "the evicted adapter was not copied back"
    finally:
        gateway.stop()
        registry.close()
