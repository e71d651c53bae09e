"""The adapter registry: tenants, immutable versions, movable aliases, validated atomic publish.

A publish uploads the blobs first (content-addressed, so a retry or a twin costs nothing), then
makes the version visible in one database transaction. A process killed before that commit
leaves only unreferenced blobs, which ``gc`` removes; it never leaves a visible half version.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, func, select, text, update

import adapterdeck.registry.schema as t
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry.cache import AdapterCache
from adapterdeck.registry.db import (
    ensure_tenant,
    insert_ignore,
    iso,
    make_engine,
    migrate,
    now,
    write_transaction,
)
from adapterdeck.registry.errors import Conflict, NotFound, StorageFault
from adapterdeck.registry.private import private_dir
from adapterdeck.registry.refs import DEFAULT_ALIAS, Ref, check_alias, parse_adapter, parse_ref
from adapterdeck.registry.settings import RegistrySettings
from adapterdeck.registry.store import SHA256_RE, BlobStore, sha256_file
from adapterdeck.registry.validate import (
    BaseRecord,
    Candidate,
    base_record_for,
    file_name_problem,
    validate,
)
from adapterdeck.registry.versions import (
    ALL_VERSIONS,
    BY_ALIAS,
    BY_VERSION,
    NEWEST,
    VERSION_FROM,
    VersionInfo,
    adapter_listing,
    experiments_serving,
    version_info,
)


def _plain_files(info: VersionInfo) -> list[dict[str, Any]]:
    """A version's files, once each is known to be a plain file name: a damaged record must never
    make pull or materialize write outside the directory they fill."""
    for f in info.files:
        problem = file_name_problem(f["path"])
        if problem:
            raise StorageFault(f"{info.ref}: refusing to write its files: {problem}")
    return info.files


class Registry:
    """Open with ``Registry()`` (settings from ``ADAPTERDECK_*``) or ``Registry(RegistrySettings(...))``."""

    def __init__(self, settings: RegistrySettings | None = None) -> None:
        self.settings = settings or RegistrySettings()
        private_dir(self.settings.home.expanduser())
        self.engine = make_engine(self.settings.resolved_database_url())
        migrate(self.engine)
        self.store = BlobStore(self.settings.resolved_storage_url(), self.settings.storage_options)
        self.cache = self.adapter_cache(self.settings.resolved_cache_dir())

    def adapter_cache(self, directory: Path) -> AdapterCache:
        """The bounded adapter cache at ``directory``, with this registry's bounds."""
        return AdapterCache(
            self.store, directory, self.settings.cache_max_bytes, self.settings.cache_min_idle_seconds
        )

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise (sqlalchemy.exc.SQLAlchemyError) unless the database answers."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- bases -------------------------------------------------------------------------------

    def bases(self) -> list[BaseRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.bases).order_by(t.bases.c.id)).all()
        return [BaseRecord(r.id, r.name, r.fingerprint, r.config, r.chat_template_sha256) for r in rows]

    def find_base(self, fingerprint: str) -> BaseRecord | None:
        return next((b for b in self.bases() if b.fingerprint == fingerprint), None)

    def add_base(self, name: str) -> BaseRecord:
        """Record a base model (local dir or hub id) that adapters may be published for."""
        record = base_record_for(name)
        with write_transaction(self.engine) as conn:
            self._ensure_base(conn, record)
        found = self.find_base(record.fingerprint)
        assert found is not None
        return found

    def _ensure_base(self, conn: Connection, base: BaseRecord) -> int:
        if base.id is not None:
            return base.id
        insert_ignore(
            conn,
            t.bases,
            {
                "name": base.name,
                "fingerprint": base.fingerprint,
                "config": json.loads(json.dumps(base.config, default=str)),
                "chat_template_sha256": base.chat_template_sha256,
                "created_at": now(),
            },
            ["fingerprint"],
        )
        return conn.execute(
            select(t.bases.c.id).where(t.bases.c.fingerprint == base.fingerprint)
        ).scalar_one()

    # -- publish -----------------------------------------------------------------------------

    def validate(self, path: str | Path, base: str | None = None) -> Candidate:
        """Run every publish check without storing anything."""
        return validate(
            path,
            find_base=self.find_base,
            known_bases=self.bases,
            max_rank=self.settings.max_lora_rank,
            max_bytes=self.settings.max_adapter_bytes,
            base=base,
        )

    def publish(
        self,
        path: str | Path,
        adapter: str,
        *,
        alias: str | None = None,
        base: str | None = None,
        source: str = "published",
    ) -> VersionInfo:
        """Validate, store and make visible a new version of ``tenant/name``; returns it."""
        ref = parse_adapter(adapter)
        if alias is not None:
            check_alias(alias)
        candidate = self.validate(path, base)
        if candidate.parent is not None and parse_ref(candidate.parent).tenant != ref.tenant:
            raise AdapterdeckError(
                f"{path} was tuned from {candidate.parent}, tenant {parse_ref(candidate.parent).tenant!r}'s "
                f"adapter; it cannot be published to tenant {ref.tenant!r}"
            )
        entries = []
        for name, local, size in candidate.files:
            sha = sha256_file(local)
            self.store.put_file(local, sha)
            entries.append({"path": name, "sha256": sha, "size": size})
        manifest = {
            "adapter": ref.adapter,
            "files": entries,
            "peft_type": candidate.peft_type,
            "base_fingerprint": candidate.base.fingerprint,
        }
        manifest_sha = self.store.put_bytes(json.dumps(manifest, sort_keys=True).encode())
        report_sha = None
        if candidate.report is not None:
            report_sha = self.store.put_bytes(json.dumps(candidate.report, sort_keys=True).encode())
        with write_transaction(self.engine) as conn:
            base_id = self._ensure_base(conn, candidate.base)
            tenant_id = ensure_tenant(conn, ref.tenant)
            insert_ignore(
                conn,
                t.adapters,
                {"tenant_id": tenant_id, "name": ref.name, "last_version": 0, "created_at": now()},
                ["tenant_id", "name"],
            )
            adapter_id, number = conn.execute(
                update(t.adapters)
                .where(and_(t.adapters.c.tenant_id == tenant_id, t.adapters.c.name == ref.name))
                .values(last_version=t.adapters.c.last_version + 1)
                .returning(t.adapters.c.id, t.adapters.c.last_version)
            ).one()
            version_id = conn.execute(
                t.versions.insert()
                .values(
                    adapter_id=adapter_id,
                    version=number,
                    manifest_sha256=manifest_sha,
                    base_id=base_id,
                    peft_type=candidate.peft_type,
                    method=candidate.method,
                    params=candidate.params,
                    served_by=candidate.served_by,
                    rank=candidate.rank,
                    dataset_sha256=candidate.dataset_sha256,
                    data_format=candidate.data_format,
                    metrics=candidate.metrics,
                    chat_template_sha256=candidate.base.chat_template_sha256,
                    size_bytes=candidate.size_bytes,
                    library_versions=candidate.library_versions,
                    report_sha256=report_sha,
                    parent=candidate.parent,
                    source=source,
                    created_at=now(),
                )
                .returning(t.versions.c.id)
            ).scalar_one()
            conn.execute(t.version_files.insert(), [{"version_id": version_id, **e} for e in entries])
            if alias is not None:
                self.move_alias(conn, adapter_id, alias, version_id, number)
        return self.show(f"{ref.adapter}@{number}")

    def import_adapter(
        self, path: str | Path, adapter: str, *, base: str | None = None, alias: str | None = None
    ) -> VersionInfo:
        """Publish an adapter made elsewhere with plain PEFT."""
        return self.publish(path, adapter, alias=alias, base=base, source="imported")

    # -- resolve and read --------------------------------------------------------------------

    def resolve(self, ref: str | Ref) -> VersionInfo:
        """The version a reference means now: ``t/n@N``, ``t/n:alias``, or ``t/n`` (prod, else newest)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        params = {"tenant": ref.tenant, "name": ref.name}
        with self.engine.connect() as conn:
            if ref.version is not None:
                row = conn.execute(BY_VERSION, {**params, "version": ref.version}).first()
            else:
                row = conn.execute(BY_ALIAS, {**params, "alias": ref.alias or DEFAULT_ALIAS}).first()
                if row is None and ref.alias is None:
                    row = conn.execute(NEWEST, params).first()
        if row is None:
            raise NotFound(f"no adapter version {ref}")
        return version_info(row)

    def show(self, ref: str | Ref) -> VersionInfo:
        """Like ``resolve``, with the version's files and the aliases pointing at it."""
        info = self.resolve(ref)
        with self.engine.connect() as conn:
            version_id = self.version_id(conn, info)
            files = conn.execute(
                select(t.version_files.c.path, t.version_files.c.sha256, t.version_files.c.size)
                .where(t.version_files.c.version_id == version_id)
                .order_by(t.version_files.c.path)
            ).all()
            aliases = conn.execute(
                select(t.aliases.c.alias)
                .where(t.aliases.c.version_id == version_id)
                .order_by(t.aliases.c.alias)
            ).scalars()
            info.files = [dict(r._mapping) for r in files]
            info.aliases = list(aliases)
        return info

    def versions(self, adapter: str) -> list[VersionInfo]:
        """Every version of ``tenant/name``, oldest first, each with the aliases pointing at it
        (one query; no files)."""
        ref = parse_adapter(adapter)
        found: dict[int, VersionInfo] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(ALL_VERSIONS, {"tenant": ref.tenant, "name": ref.name}):
                info = found.setdefault(row.version, version_info(row))
                if row.alias is not None:
                    info.aliases.append(row.alias)
        if not found:
            raise NotFound(f"no adapter {ref.adapter}")
        return list(found.values())

    def report(self, ref: str | Ref) -> dict[str, Any] | None:
        """The run report published with ``ref`` (loss curves, metrics, samples), None without one."""
        info = self.resolve(ref)
        if info.report_sha256 is None:
            return None
        return json.loads(self.store.get_bytes(info.report_sha256))

    def version_id(self, conn: Connection, info: VersionInfo) -> int:
        """The row id of a resolved version, inside ``conn``'s transaction."""
        return conn.execute(
            select(t.versions.c.id)
            .select_from(VERSION_FROM)
            .where(
                t.tenants.c.name == info.tenant,
                t.adapters.c.name == info.name,
                t.versions.c.version == info.version,
            )
        ).scalar_one()

    def list(
        self, tenant: str | None = None, *, after: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The adapters (of one tenant, or all) that have a version, with their versions and
        aliases, ordered by name: all of them, or ``limit`` of them past the adapter ``after``
        (``tenant/name``). Three queries, whatever the number of adapters."""
        with self.engine.connect() as conn:
            return adapter_listing(conn, tenant, after=parse_adapter(after) if after else None, limit=limit)

    def alias_history(self, adapter: str) -> list[dict[str, Any]]:
        ref = parse_adapter(adapter)
        with self.engine.connect() as conn:
            adapter_id = self.adapter_id(conn, ref)
            rows = conn.execute(
                select(t.alias_events)
                .where(t.alias_events.c.adapter_id == adapter_id)
                .order_by(t.alias_events.c.id)
            ).all()
        return [{"alias": r.alias, "from": r.old_version, "to": r.new_version, "at": iso(r.at)} for r in rows]

    def adapter_id(self, conn: Connection, ref: Ref, *, lock: bool = False) -> int:
        """The row id of ``ref``'s adapter; ``lock`` holds its row (PostgreSQL) until ``conn``'s
        transaction ends, so changes to one adapter's aliases take turns."""
        query = (
            select(t.adapters.c.id)
            .select_from(t.adapters.join(t.tenants, t.tenants.c.id == t.adapters.c.tenant_id))
            .where(t.tenants.c.name == ref.tenant, t.adapters.c.name == ref.name)
        )
        adapter_id = conn.execute(query.with_for_update(of=t.adapters) if lock else query).scalar()
        if adapter_id is None:
            raise NotFound(f"no adapter {ref.adapter}")
        return adapter_id

    # -- aliases, delete -----------------------------------------------------------------------

    def set_alias(self, adapter: str, alias: str, version: int) -> VersionInfo:
        """Point ``tenant/name:alias`` at version ``version`` (the move is recorded)."""
        ref = parse_adapter(adapter)
        check_alias(alias)
        target = self.resolve(Ref(ref.tenant, ref.name, version=version))
        with write_transaction(self.engine) as conn:
            # One alias move per adapter at a time, as in publish (whose UPDATE locks the same row):
            # move_alias reads, then inserts or updates. SQLite's BEGIN IMMEDIATE already serializes.
            adapter_id = self.adapter_id(conn, ref, lock=True)
            self.move_alias(conn, adapter_id, alias, self.version_id(conn, target), version)
        return self.show(f"{ref.adapter}:{alias}")

    def move_alias(self, conn: Connection, adapter_id: int, alias: str, version_id: int, number: int) -> None:
        """Point an alias at a version inside ``conn``'s transaction and record the move; the caller
        holds the adapter's row (``adapter_id(..., lock=True)``) and has checked the names."""
        key = and_(t.aliases.c.adapter_id == adapter_id, t.aliases.c.alias == alias)
        old = conn.execute(
            select(t.versions.c.version)
            .select_from(t.aliases.join(t.versions, t.versions.c.id == t.aliases.c.version_id))
            .where(key)
        ).scalar()
        if old is None:
            conn.execute(
                t.aliases.insert().values(
                    adapter_id=adapter_id, alias=alias, version_id=version_id, updated_at=now()
                )
            )
        else:
            conn.execute(update(t.aliases).where(key).values(version_id=version_id, updated_at=now()))
        conn.execute(
            t.alias_events.insert().values(
                adapter_id=adapter_id, alias=alias, old_version=old, new_version=number, at=now()
            )
        )

    def delete(self, ref: str) -> None:
        """Delete ``tenant/name@N``; refused while an alias or a running experiment points at it. Its
        blobs go at the next gc."""
        parsed = parse_ref(ref)
        if parsed.version is None:
            raise AdapterdeckError(f"{ref}: delete takes an exact version, tenant/name@N")
        info = self.resolve(parsed)
        with write_transaction(self.engine) as conn:
            version_id = self.version_id(conn, info)
            pointing = conn.execute(
                select(t.aliases.c.alias).where(t.aliases.c.version_id == version_id)
            ).scalars()
            names = sorted(pointing)
            experiments = experiments_serving(conn, info.ref)
            if experiments:
                raise Conflict(
                    f"cannot delete {info.ref}: the running experiment on {', '.join(experiments)} "
                    "serves it; stop or promote the experiment first"
                )
            if names:
                listed = ", ".join(f"{info.tenant}/{info.name}:{a}" for a in names)
                raise Conflict(f"cannot delete {info.ref}: {listed} point(s) at it; move the alias first")
            conn.execute(t.version_files.delete().where(t.version_files.c.version_id == version_id))
            conn.execute(t.versions.delete().where(t.versions.c.id == version_id))

    # -- pull, gc ------------------------------------------------------------------------------

    def pull(self, ref: str, out: str | Path) -> Path:
        """Write the version's files to ``out`` (a plain PEFT directory), all or nothing."""
        info = self.show(ref)
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise AdapterdeckError(f"{out} is not empty")
        files = _plain_files(info)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
        tmp.mkdir()
        try:
            for f in files:
                self.store.get_file(f["sha256"], tmp / f["path"])
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def materialize(self, info: VersionInfo, cache: Path | None = None) -> Path:
        """The version's files in ``<cache>/<manifest sha256>`` (default: the settings' cache
        directory): copied once, visible only when complete, marked as used, and the cache kept
        within its bound (``registry/cache.py``).

        Several processes may materialize the same version at once; each copies into a temporary
        directory and the first rename wins (the copies are identical).
        """
        if not info.files:
            info = self.show(info.ref)
        files = _plain_files(info)
        if not SHA256_RE.fullmatch(info.manifest_sha256):
            raise StorageFault(f"{info.ref}: its manifest digest is damaged; refusing to materialize it")
        adapters = self.cache if cache is None else self.adapter_cache(cache)
        return adapters.fill(info.manifest_sha256, files)

    def gc(self, grace_seconds: float = 3600) -> dict[str, int]:
        """Remove blobs no version references, older than ``grace_seconds`` (a publish may be in flight)."""
        with self.engine.connect() as conn:
            used = set(conn.execute(select(t.version_files.c.sha256).distinct()).scalars())
            used |= set(conn.execute(select(t.versions.c.manifest_sha256)).scalars())
            used |= set(conn.execute(select(t.versions.c.report_sha256)).scalars()) - {None}
        removed = kept = 0
        for name, age in list(self.store.blobs()):
            if name in used or age < grace_seconds:
                kept += 1
                continue
            self.store.delete(name)
            removed += 1
        return {"removed": removed, "kept": kept, "referenced": len(used)}

    def count_versions(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(t.versions)).scalar_one()
