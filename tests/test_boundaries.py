"""Boundaries a hostile probe tested: adapters without weights, list cursors of another tenant,
key revocation by prefix, the reserved tenant name ``admin``.

A real ``adapterdeck serve`` gateway (without vLLM: none of these endpoints reaches an engine) on a
real registry, SQLite and PostgreSQL, driven over HTTP; the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import save_file
from sqlalchemy import select

from adapterdeck.core.demo import write_demo_dataset
from adapterdeck.registry import InvalidRef, PublishRefused, Registry, RegistrySettings
from adapterdeck.registry import schema as t
from adapterdeck.registry.db import write_transaction
from adapterdeck.registry.tenants import create_key, key_digest, revoke_key

from .conftest import free_port, run_cli
from .gateway_helpers import GatewayProcess, start_gateway
from .registry_helpers import local_blob_names, make_lora, postgres_database

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX_LENGTH = 10  # "adk_" and 6 more: what is stored of a key besides its digest


@dataclass
class Stack:
    registry: Registry
    gateway: GatewayProcess
    env: dict[str, str]
    keys: dict[str, str]
    lora: Path
    work: Path

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.gateway.url, headers={"Authorization": f"Bearer {self.keys[who]}"}, timeout=60
        )

    def state(self) -> tuple[Any, int, set[str]]:
        storage = Path(self.registry.settings.resolved_storage_url())
        return self.registry.list(), self.registry.count_versions(), local_blob_names(storage)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, base_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp(f"boundaries-{request.param}")
    with postgres_database() if request.param == "postgresql" else nullcontext() as url:
        env = {"ADAPTERDECK_HOME": str(work / "home")}
        if url:
            env["ADAPTERDECK_DATABASE_URL"] = url
        registry = Registry(RegistrySettings(home=work / "home", database_url=url))
        keys = {"acme": create_key(registry, "acme"), "globex": create_key(registry, "globex")}
        keys["admin"] = create_key(registry, None)
        lora = make_lora(base_model, work / "lora", seed=3)
        gateway = start_gateway(
            base_model,
            f"http://127.0.0.1:{free_port()}",  # no vLLM
            env,
            work,
            served_name="tiny",
            ready=lambda reply: "status" in reply.json(),  # answering (no vLLM here)
        )
        try:
            yield Stack(registry, gateway, env, keys, lora, work)
        finally:
            gateway.stop()
            registry.close()


def _multipart(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir()) if p.is_file()]


# -- 5: an adapter whose weights file holds no tensors ----------------------------------------------


def _without_tensors(stack: Stack, name: str, metadata: dict[str, str] | None) -> Path:
    directory = stack.work / name
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(stack.lora, directory)
    save_file({}, str(directory / WEIGHTS), metadata=metadata)
    return directory


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}], ids=["empty", "metadata-only"])
def test_an_adapter_without_tensors_is_refused_everywhere(stack: Stack, metadata: dict | None) -> None:
    directory = _without_tensors(stack, f"no-tensors-{bool(metadata)}", metadata)
    reason = f"{WEIGHTS} holds no tensors: the adapter has no trained weights"
    before = stack.state()

    with pytest.raises(PublishRefused) as refused:
        stack.registry.publish(directory, "acme/empty")
    assert reason in refused.value.reasons

    with stack.http("admin") as http:
        reply = http.post("/v1/adapters/acme/empty/versions", files=_multipart(directory))
    assert reply.status_code == 400, reply.text
    assert reason in reply.json()["error"]["message"]

    result = run_cli("registry", "validate", str(directory), env=stack.env)
    assert result.returncode != 0 and reason in result.stderr, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert stack.state() == before

    # The control: the same directory with its weights back is published.
    shutil.copy2(stack.lora / WEIGHTS, directory / WEIGHTS)
    with stack.http("admin") as http:
        reply = http.post("/v1/adapters/acme/empty/versions", files=_multipart(directory))
    assert reply.status_code == 201, reply.text


# -- 7: list cursors are looked up as the caller sees them -------------------------------------------


def _upload(stack: Stack, who: str, name: str, seed: int) -> str:
    path = write_demo_dataset(stack.work / name, task="sentiment", n=12, seed=seed)
    with stack.http(who) as http:
        reply = http.post(
            "/v1/files", files={"file": (name, path.read_bytes())}, data={"purpose": "fine-tune"}
        )
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def _job(stack: Stack, who: str, file_id: str) -> str:
    with stack.http(who) as http:
        reply = http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def test_another_tenant_s_cursor_is_the_same_404_as_an_unknown_one(stack: Stack) -> None:
    mine = [_upload(stack, "acme", f"acme-{i}.jsonl", i) for i in range(3)]
    theirs = _upload(stack, "globex", "globex.jsonl", 9)
    my_jobs = [_job(stack, "acme", mine[0]) for _ in range(2)]
    their_job = _job(stack, "globex", theirs)
    unknown_file, unknown_job = "file-" + "0" * 24, "ftjob-" + "0" * 24

    with stack.http("acme") as http:
        for path, foreign, unknown in (
            ("/v1/files", theirs, unknown_file),
            ("/v1/fine_tuning/jobs", their_job, unknown_job),
        ):
            replies = [http.get(path, params={"after": cursor}) for cursor in (foreign, unknown)]
            assert [r.status_code for r in replies] == [404, 404], [r.text for r in replies]
            errors = [r.json()["error"] for r in replies]
            # Word for word the same answer, but for the id that was asked about.
            assert errors[0]["message"].replace(foreign, "ID") == errors[1]["message"].replace(unknown, "ID")
            assert {(e["param"], e["code"], e["type"]) for e in errors} == {
                (errors[1]["param"], errors[1]["code"], errors[1]["type"])
            }
            assert errors[1]["param"] == "after"

        # The caller's own cursors page as before.
        page = http.get("/v1/files", params={"after": mine[2], "limit": 1}).json()
        assert [f["id"] for f in page["data"]] == [mine[1]] and page["has_more"] is True
        page = http.get("/v1/fine_tuning/jobs", params={"after": my_jobs[1]}).json()
        assert [j["id"] for j in page["data"]] == [my_jobs[0]]

    # An admin sees every tenant's: another tenant's cursor is a cursor for it.
    with stack.http("admin") as http:
        page = http.get("/v1/files", params={"after": theirs, "limit": 1}).json()
        assert [f["id"] for f in page["data"]] == [mine[2]]
        page = http.get("/v1/fine_tuning/jobs", params={"after": their_job, "limit": 1}).json()
        assert [j["id"] for j in page["data"]] == [my_jobs[1]]


# -- 8: revoking a key by a prefix that matches nothing is an error ----------------------------------


def _authorized(stack: Stack, key: str) -> int:
    return httpx.get(
        f"{stack.gateway.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ).status_code


def test_revoke_refuses_a_prefix_that_matches_nothing_and_says_what_length_is_needed(stack: Stack) -> None:
    key = create_key(stack.registry, "acme")
    assert _authorized(stack, key) == 200
    for prefix in (key[:8], key[:9]):
        result = run_cli("tenant", "revoke", prefix, env=stack.env)
        assert result.returncode != 0, result.stdout + result.stderr
        message = result.stderr.strip()
        assert message.startswith("error:") and len(message.splitlines()) == 1, message
        assert f"{len(prefix)} characters" in message and f"first {PREFIX_LENGTH} characters" in message
    other = key[: PREFIX_LENGTH - 1] + ("A" if key[PREFIX_LENGTH - 1] != "A" else "B")
    result = run_cli("tenant", "revoke", other, env=stack.env)
    assert result.returncode != 0 and "nothing was revoked" in result.stderr, result.stderr
    time.sleep(11)  # longer than the gateway's key cache: nothing above revoked the key
    assert _authorized(stack, key) == 200

    result = run_cli("tenant", "revoke", key[:PREFIX_LENGTH], env=stack.env)
    assert result.returncode == 0 and "revoked 1 key(s)" in result.stdout, result.stdout + result.stderr
    deadline = time.monotonic() + 15
    while _authorized(stack, key) != 401:
        assert time.monotonic() < deadline, "the revoked key still works after 15 s"
        time.sleep(0.5)
    # Revoking it again revokes nothing: an error too.
    result = run_cli("tenant", "revoke", key[:PREFIX_LENGTH], env=stack.env)
    assert result.returncode != 0 and "no active key" in result.stderr

    # The whole key names that key only, even when another key shares its first characters.
    first, second = create_key(stack.registry, "acme"), create_key(stack.registry, "acme")
    with write_transaction(stack.registry.engine) as conn:
        conn.execute(
            t.api_keys.update()
            .where(t.api_keys.c.key_sha256 == key_digest(second))
            .values(prefix=first[:PREFIX_LENGTH])
        )
    assert revoke_key(stack.registry, first) == 1
    with stack.registry.engine.connect() as conn:
        active = conn.execute(
            select(t.api_keys.c.key_sha256).where(
                t.api_keys.c.revoked_at.is_(None), t.api_keys.c.prefix == first[:PREFIX_LENGTH]
            )
        ).scalars()
        assert list(active) == [key_digest(second)]


# -- 9: "admin" is not a tenant name -----------------------------------------------------------------


def test_the_tenant_name_admin_is_reserved(stack: Stack) -> None:
    result = run_cli("tenant", "create", "admin", env=stack.env)
    assert result.returncode != 0, result.stdout
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "tenant name 'admin' is reserved" in message, message
    assert "adk_" not in result.stdout
    with pytest.raises(InvalidRef, match="reserved"):
        create_key(stack.registry, "admin")
    with stack.http("admin") as http:
        reply = http.post("/v1/adapters/admin/x/versions", files=_multipart(stack.lora))
    assert reply.status_code == 400 and "reserved" in reply.json()["error"]["message"], reply.text
    with stack.registry.engine.connect() as conn:
        names = set(conn.execute(select(t.tenants.c.name)).scalars())
    assert "admin" not in names


def test_a_key_made_for_a_tenant_named_admin_before_the_name_was_reserved_is_refused(stack: Stack) -> None:
    # As an older release made it: a tenant row named admin and a tenant key for it.
    key = "adk_" + "z" * 43
    now = datetime.now(UTC)
    with write_transaction(stack.registry.engine) as conn:
        conn.execute(t.tenants.insert().values(name="admin", created_at=now))
        tenant_id = conn.execute(select(t.tenants.c.id).where(t.tenants.c.name == "admin")).scalar_one()
        conn.execute(
            t.api_keys.insert().values(
                tenant_id=tenant_id, key_sha256=key_digest(key), prefix=key[:PREFIX_LENGTH], role="tenant",
                created_at=now,
            )
        )  # fmt: skip
    try:
        # The admin key's own traffic is labelled tenant="admin"...
        with stack.http("admin") as http:
            http.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert 'tenant="admin"' in http.get("/metrics").text
        # ...and a tenant named admin does not get to read it.
        reply = httpx.get(
            f"{stack.gateway.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert reply.status_code == 401, reply.text
        assert json.loads(reply.text)["error"]["message"]
    finally:
        with write_transaction(stack.registry.engine) as conn:
            conn.execute(t.api_keys.delete().where(t.api_keys.c.key_sha256 == key_digest(key)))
            conn.execute(t.tenants.delete().where(t.tenants.c.name == "admin"))


def test_registry_validate_json_lists_every_reason_or_what_would_be_published(stack: Stack) -> None:
    directory = _without_tensors(stack, "no-tensors-json", None)
    (directory / "notes.txt").write_text("not part of an adapter\n")
    refused = run_cli("registry", "validate", str(directory), "--json", env=stack.env)
    assert refused.returncode == 1, refused.stderr
    report = json.loads(refused.stdout)
    assert report["ok"] is False and report["path"] == str(directory)
    assert f"{WEIGHTS} holds no tensors: the adapter has no trained weights" in report["reasons"]
    assert any("unexpected file 'notes.txt'" in r for r in report["reasons"]), report["reasons"]

    sound = run_cli("registry", "validate", str(stack.lora), "--json", env=stack.env)
    assert sound.returncode == 0, sound.stderr
    report = json.loads(sound.stdout)
    assert report["ok"] is True and report["reasons"] == []
    assert report["peft_type"] == "LORA" and report["rank"] == 8
    assert report["served_by"] == ["vllm", "peft"]
    assert {f["path"] for f in report["files"]} == {CONFIG, WEIGHTS, "README.md"}

    missing = run_cli("registry", "validate", str(stack.work / "nowhere"), "--json", env=stack.env)
    assert missing.returncode == 1 and json.loads(missing.stdout)["reasons"] == [
        f"{stack.work / 'nowhere'} is not a directory"
    ]
