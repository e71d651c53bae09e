"""Helpers for the registry tests: adapters made without training, version checks, registries of
thousands of versions filled from a template (``bulk_fill``, also the registry benchmark's), a
PostgreSQL database per test, and a warm interpreter that forks real CLI processes.

Run as a script, this file is that warm interpreter (see ``CliForker``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


# -- adapters ---------------------------------------------------------------------------------


def make_lora(base: Path, out: Path, *, seed: int = 0, safetensors: bool = True, **overrides: Any) -> Path:
    """A PEFT LoRA adapter saved straight from ``get_peft_model`` on ``base`` (random A and B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    options: dict[str, Any] = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": LORA_TARGETS,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "init_lora_weights": False,  # B random too, so every adapter's weights are distinct
    }
    options.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    peft_model = get_peft_model(model, LoraConfig(**options))
    peft_model.save_pretrained(str(out), safe_serialization=safetensors)
    return out


def claim_vllm(adapter: Path, base: Path) -> Path:
    """Add the ``adapterdeck.json`` a LoRA training run writes: the adapter says vLLM serves it."""
    from adapterdeck.core.basemodel import fingerprint

    meta = {
        "method": "lora",
        "params": {},
        "served_by": ["vllm", "peft"],
        "base": str(base),
        "base_fingerprint": fingerprint(str(base)),
    }
    (adapter / "adapterdeck.json").write_text(json.dumps(meta, indent=2) + "\n")
    return adapter


def truncated_copy(adapter: Path, out: Path) -> Path:
    """A copy whose weights file lost its second half (an interrupted download)."""
    shutil.copytree(adapter, out)
    data = (adapter / WEIGHTS).read_bytes()
    (out / WEIGHTS).write_bytes(data[: len(data) // 2])
    return out


def variant(adapter: Path, out: Path, index: int) -> Path:
    """A copy with its own README and slightly different weights: every blob of it is new."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(adapter, out)
    with safe_open(str(adapter / WEIGHTS), "pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 0.001 * (index + 1)
    save_file(tensors, str(out / WEIGHTS), metadata=metadata)
    with (out / "README.md").open("a") as fh:
        fh.write(f"\nvariant {index}\n")
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file of an adapter directory (what a publish stores) by name, with its bytes."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- registry contents ------------------------------------------------------------------------


def check_version_complete(registry: Any, ref: str, dest: Path) -> dict[str, Any]:
    """Pull ``ref`` to ``dest`` and check it against its manifest blob: every file, every digest.

    Returns the manifest.
    """
    info = registry.show(ref)
    manifest = json.loads(registry.store.get_bytes(info.manifest_sha256))
    assert manifest["adapter"] == f"{info.tenant}/{info.name}"
    assert manifest["base_fingerprint"] == info.base_fingerprint
    assert manifest["peft_type"] == info.peft_type
    expected = {e["path"]: (e["sha256"], e["size"]) for e in manifest["files"]}
    assert expected, f"{ref}: the manifest lists no files"
    assert {f["path"]: (f["sha256"], f["size"]) for f in info.files} == expected
    assert sum(size for _, size in expected.values()) == info.size_bytes
    out = registry.pull(ref, dest)
    pulled = {p.name: p for p in out.iterdir()}
    assert set(pulled) == set(expected), f"{ref}: pulled {sorted(pulled)}, manifest {sorted(expected)}"
    for name, path in pulled.items():
        assert (sha256_of(path), path.stat().st_size) == expected[name], f"{ref}: {name} differs"
    return manifest


def referenced_blobs(registry: Any) -> set[str]:
    """The blobs the visible versions need: their files and their manifests."""
    needed: set[str] = set()
    for adapter in registry.list():
        for number in adapter["versions"]:
            info = registry.show(f"{adapter['adapter']}@{number}")
            needed.add(info.manifest_sha256)
            needed.update(f["sha256"] for f in info.files)
    return needed


def local_blob_names(storage: Path) -> set[str]:
    """Names of every file under a local store's ``blobs/`` (temporary files included)."""
    root = storage / "blobs"
    if not root.exists():
        return set()
    return {p.name for p in root.rglob("*") if p.is_file()}


def bulk_fill(
    registry: Any,
    adapters: list[str],
    per_adapter: int,
    template_ref: str,
    aliases: Sequence[tuple[str, str, int]] = (),
) -> dict[str, Any]:
    """Give every adapter of ``adapters`` versions 1..``per_adapter`` (those not there yet), as rows
    copied from the published version ``template_ref`` (same columns, JSON values and files; only
    the adapter, version number, manifest and timestamps differ), and the ``aliases`` (adapter,
    alias, version) not there yet, with their history. Thousands of versions in seconds, where as
    many validated publishes would take an hour and test nothing new.

    Each adapter gets the manifest a publish of the template's files under its name would have
    stored (so each has its own cache directory, as real adapters do); its versions share it.
    """
    from datetime import UTC, datetime

    from sqlalchemy import select, text, update

    from adapterdeck.registry import schema as t
    from adapterdeck.registry.db import write_transaction

    started = time.perf_counter()
    template = registry.show(template_ref)
    files = [{k: f[k] for k in ("path", "sha256", "size")} for f in template.files]
    manifests = {}
    for adapter in adapters:
        manifest = {
            "adapter": adapter,
            "files": files,
            "peft_type": template.peft_type,
            "base_fingerprint": template.base_fingerprint,
        }
        manifests[adapter] = registry.store.put_bytes(json.dumps(manifest, sort_keys=True).encode())
    now = datetime.now(UTC)
    with write_transaction(registry.engine) as conn:
        template_id = registry.version_id(conn, template)
        row = conn.execute(select(t.versions).where(t.versions.c.id == template_id)).one()._asdict()
        for key in ("id", "adapter_id", "version", "created_at", "manifest_sha256"):
            row.pop(key)
        have_tenants = set(conn.execute(select(t.tenants.c.name)).scalars())
        new_tenants = sorted({a.split("/")[0] for a in adapters} - have_tenants)
        if new_tenants:
            conn.execute(t.tenants.insert(), [{"name": n, "created_at": now} for n in new_tenants])
        tenant_ids = dict(conn.execute(select(t.tenants.c.name, t.tenants.c.id)).all())

        def adapter_ids() -> dict[str, int]:
            query = select(t.tenants.c.name, t.adapters.c.name, t.adapters.c.id).select_from(
                t.adapters.join(t.tenants, t.tenants.c.id == t.adapters.c.tenant_id)
            )
            return {f"{tn}/{an}": i for tn, an, i in conn.execute(query).all()}

        have_adapters = adapter_ids()
        new_adapters = [a for a in adapters if a not in have_adapters]
        if new_adapters:
            conn.execute(
                t.adapters.insert(),
                [
                    {
                        "tenant_id": tenant_ids[a.split("/")[0]],
                        "name": a.split("/")[1],
                        "last_version": per_adapter,
                        "created_at": now,
                    }
                    for a in new_adapters
                ],
            )
        ids = adapter_ids()
        conn.execute(
            update(t.adapters)
            .where(t.adapters.c.id.in_([ids[a] for a in adapters]))
            .values(last_version=per_adapter)
        )
        have_versions = set(conn.execute(select(t.versions.c.adapter_id, t.versions.c.version)).all())
        new_versions = [
            {
                **row,
                "adapter_id": ids[a],
                "version": v,
                "manifest_sha256": manifests[a],
                "source": "bulk",
                "created_at": now,
            }
            for a in adapters
            for v in range(1, per_adapter + 1)
            if (ids[a], v) not in have_versions
        ]
        if new_versions:
            conn.execute(t.versions.insert(), new_versions)
        version_ids = {
            (a, v): i
            for i, a, v in conn.execute(
                select(t.versions.c.id, t.versions.c.adapter_id, t.versions.c.version)
            ).all()
        }
        new_ids = [version_ids[(r["adapter_id"], r["version"])] for r in new_versions]
        if new_ids:
            conn.execute(t.version_files.insert(), [{"version_id": i, **f} for i in new_ids for f in files])
        have_aliases = set(conn.execute(select(t.aliases.c.adapter_id, t.aliases.c.alias)).all())
        missing = [(ids[a], alias, v) for a, alias, v in aliases if (ids[a], alias) not in have_aliases]
        if missing:
            conn.execute(
                t.aliases.insert(),
                [
                    {"adapter_id": i, "alias": alias, "version_id": version_ids[(i, v)], "updated_at": now}
                    for i, alias, v in missing
                ],
            )
            conn.execute(
                t.alias_events.insert(),
                [
                    {"adapter_id": i, "alias": alias, "old_version": None, "new_version": v, "at": now}
                    for i, alias, v in missing
                ],
            )
    # What the database does after a bulk load anyway (PostgreSQL's autovacuum); SQLite keeps no
    # statistics unless asked, so it is left as a user's registry would be.
    if registry.engine.dialect.name == "postgresql":
        with registry.engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
    return {"versions": len(new_versions), "aliases": len(missing), "seconds": time.perf_counter() - started}


# -- PostgreSQL -------------------------------------------------------------------------------


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database; yields its SQLAlchemy URL and drops it afterwards."""
    import psycopg

    name = f"adapterdeck_{uuid.uuid4().hex}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(name=name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- real CLI processes, forked from a warm interpreter -----------------------------------------


class CliForker:
    """Starts real ``adapterdeck`` CLI processes, quickly.

    A cold ``adapterdeck registry publish`` spends ~9 CPU-seconds importing torch, transformers
    and peft before it does anything. This helper starts one interpreter (this file as a script)
    that imports them once, then forks a child per CLI invocation: each child is a separate OS
    process with its own database connections that runs ``adapterdeck.core.cli.main()`` with the
    given arguments, exactly as the console script does, its output going to a log file. Children
    of one ``start`` are released together through a pipe. Their pids are real: tests SIGKILL them.
    A child is reaped only by ``wait``, so its pid cannot be reused before then.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self._stderr = (log_dir / "forker.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        ready = self._read()
        assert ready.get("ready"), ready

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI forker died:\n{(self.log_dir / 'forker.log').read_text()[-4000:]}")
        return json.loads(line)

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def start(self, argv: list[str], n: int = 1) -> list[int]:
        """Fork ``n`` processes running ``adapterdeck *argv``, released at the same moment."""
        return self.start_each([argv] * n)

    def start_each(self, argvs: list[list[str]]) -> list[int]:
        """Fork a process per argument list, all released at the same moment."""
        return self._ask({"op": "start", "argvs": argvs, "log_dir": str(self.log_dir)})["pids"]

    def wait(self, pid: int) -> dict[str, Any]:
        """Reap a child: ``status`` (exit code, or -signal), ``elapsed`` seconds, ``output``."""
        result = self._ask({"op": "wait", "pid": pid})
        result["output"] = (self.log_dir / f"{pid}.log").read_text()
        return result

    def run(self, argv: list[str]) -> dict[str, Any]:
        [pid] = self.start(argv)
        return self.wait(pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def _child(argv: list[str], gate: int, log_dir: str) -> None:
    """In a forked child: wait for the release, run the CLI, exit with its code."""
    code = 1
    try:
        os.read(gate, 1)  # returns at EOF, when the parent closes the pipe's write end
        os.close(gate)
        log = os.open(f"{log_dir}/{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        from adapterdeck.core import cli

        sys.argv = ["adapterdeck", *argv]
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    """The forker: import the heavy modules once, then fork CLI children on request."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the imports print goes to the log, not into the protocol
    import alembic.command  # noqa: F401
    import peft  # noqa: F401
    import psycopg  # noqa: F401
    import sqlalchemy.dialects.postgresql
    import sqlalchemy.dialects.sqlite  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from adapterdeck.core import cli  # noqa: F401  (loads the plugins: the registry's commands)

    released: dict[int, float] = {}
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            read_end, write_end = os.pipe()
            pids = []
            for argv in request["argvs"]:
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    os.close(write_end)
                    _child(argv, read_end, request["log_dir"])
                pids.append(pid)
            os.close(read_end)
            now = time.monotonic()
            os.close(write_end)  # go
            released.update(dict.fromkeys(pids, now))
            protocol.write(json.dumps({"pids": pids}) + "\n")
        elif request["op"] == "wait":
            pid = request["pid"]
            _, status = os.waitpid(pid, 0)
            elapsed = time.monotonic() - released.pop(pid)
            reply = {"pid": pid, "status": os.waitstatus_to_exitcode(status), "elapsed": elapsed}
            protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _serve()
