"""Version records: what a version is, and the statements that find versions.

Resolving is the hot path of serving: its statements are built once, with bind parameters. Listing
adapters takes three queries whatever the number of adapters, and pages by name (``after`` and
``limit``); the model names ``/v1/models`` lists come from ``registry/catalog.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, exists, select, tuple_

import adapterdeck.registry.schema as t
from adapterdeck.registry.db import iso
from adapterdeck.registry.refs import Ref


@dataclass
class VersionInfo:
    ref: str
    tenant: str
    name: str
    version: int
    base: str
    base_fingerprint: str
    peft_type: str
    method: str
    params: dict[str, Any]
    served_by: list[str]
    rank: int | None
    dataset_sha256: str | None
    data_format: str | None
    metrics: dict[str, Any] | None
    chat_template_sha256: str | None
    size_bytes: int
    source: str
    created_at: str
    library_versions: dict[str, Any] | None
    manifest_sha256: str
    report_sha256: str | None = None  # the run's report.json (Registry.report reads it)
    parent: str | None = None  # the tenant/name@N it was tuned from (None: from the base)
    aliases: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_VERSION_COLUMNS = (
    t.versions.c.id,
    t.versions.c.version,
    t.versions.c.manifest_sha256,
    t.versions.c.report_sha256,
    t.versions.c.parent,
    t.versions.c.peft_type,
    t.versions.c.method,
    t.versions.c.params,
    t.versions.c.served_by,
    t.versions.c.rank,
    t.versions.c.dataset_sha256,
    t.versions.c.data_format,
    t.versions.c.metrics,
    t.versions.c.chat_template_sha256,
    t.versions.c.size_bytes,
    t.versions.c.source,
    t.versions.c.created_at,
    t.versions.c.library_versions,
    t.tenants.c.name.label("tenant"),
    t.adapters.c.name.label("adapter"),
    t.bases.c.name.label("base"),
    t.bases.c.fingerprint.label("base_fingerprint"),
)
VERSION_FROM = (
    t.versions.join(t.adapters, t.adapters.c.id == t.versions.c.adapter_id)
    .join(t.tenants, t.tenants.c.id == t.adapters.c.tenant_id)
    .join(t.bases, t.bases.c.id == t.versions.c.base_id)
)


_SAME_ADAPTER = and_(t.tenants.c.name == bindparam("tenant"), t.adapters.c.name == bindparam("name"))
BY_VERSION = (
    select(*_VERSION_COLUMNS)
    .select_from(VERSION_FROM)
    .where(_SAME_ADAPTER, t.versions.c.version == bindparam("version"))
)
ALL_VERSIONS = (
    select(*_VERSION_COLUMNS, t.aliases.c.alias)
    .select_from(
        VERSION_FROM.outerjoin(
            t.aliases,
            and_(t.aliases.c.adapter_id == t.adapters.c.id, t.aliases.c.version_id == t.versions.c.id),
        )
    )
    .where(_SAME_ADAPTER)
    .order_by(t.versions.c.version, t.aliases.c.alias)
)
BY_ALIAS = (
    select(*_VERSION_COLUMNS)
    .select_from(
        VERSION_FROM.join(
            t.aliases,
            # adapter_id too, so the lookup uses the aliases primary key instead of a scan.
            and_(t.aliases.c.adapter_id == t.adapters.c.id, t.aliases.c.version_id == t.versions.c.id),
        )
    )
    .where(_SAME_ADAPTER, t.aliases.c.alias == bindparam("alias"))
)
NEWEST = (
    select(*_VERSION_COLUMNS)
    .select_from(VERSION_FROM)
    .where(_SAME_ADAPTER)
    .order_by(t.versions.c.version.desc())
    .limit(1)
)


def version_info(row: Row) -> VersionInfo:
    return VersionInfo(
        ref=f"{row.tenant}/{row.adapter}@{row.version}",
        tenant=row.tenant,
        name=row.adapter,
        version=row.version,
        base=row.base,
        base_fingerprint=row.base_fingerprint,
        peft_type=row.peft_type,
        method=row.method,
        params=row.params,
        served_by=row.served_by,
        rank=row.rank,
        dataset_sha256=row.dataset_sha256,
        data_format=row.data_format,
        metrics=row.metrics,
        chat_template_sha256=row.chat_template_sha256,
        size_bytes=row.size_bytes,
        source=row.source,
        created_at=iso(row.created_at),
        library_versions=row.library_versions,
        manifest_sha256=row.manifest_sha256,
        report_sha256=row.report_sha256,
        parent=row.parent,
    )


def experiments_serving(conn: Connection, ref: str) -> list[str]:
    """The public names whose running experiment serves ``ref`` (as a variant or the shadow).

    Read from the experiments table itself: every caller of ``delete`` (CLI, HTTP, Python) gets the
    check inside its own write transaction, and the registry needs none of the experiments' code.
    """
    rows = conn.execute(
        select(t.tenants.c.name.label("tenant"), t.adapters.c.name.label("adapter"), t.experiments.c.variants)
        .select_from(
            t.experiments.join(t.adapters, t.adapters.c.id == t.experiments.c.adapter_id).join(
                t.tenants, t.tenants.c.id == t.adapters.c.tenant_id
            )
        )
        .where(t.experiments.c.status == t.EXPERIMENT_RUNNING)
        .order_by(t.experiments.c.id)
    ).all()
    return [
        f"{row.tenant}/{row.adapter}"
        for row in rows
        if any(v.get("ref") == ref for v in [*row.variants["variants"], row.variants.get("shadow") or {}])
    ]


def adapter_listing(
    conn: Connection, tenant: str | None, *, after: Ref | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The adapters (of one tenant, or all) that have a version, ordered by tenant and name: their
    versions and aliases. ``limit`` of them past ``after`` (an adapter, which need not exist), or
    all of them.

    Three queries: the page's adapters, then their versions and their aliases, each bounded by the
    page's first and last name (a range, not a list of ids: a full listing has no bind limit).
    """
    v, a = t.versions.c, t.aliases.c
    key = tuple_(t.tenants.c.name, t.adapters.c.name)
    adapters = (
        select(t.adapters.c.id, t.tenants.c.name.label("tenant"), t.adapters.c.name.label("adapter"))
        .select_from(t.adapters.join(t.tenants, t.tenants.c.id == t.adapters.c.tenant_id))
        .where(exists().where(v.adapter_id == t.adapters.c.id))
        .order_by(t.tenants.c.name, t.adapters.c.name)
    )
    bounds = []
    if tenant is not None:
        bounds.append(t.tenants.c.name == tenant)
    if after is not None:
        bounds.append(key > tuple_(after.tenant, after.name))
    page = conn.execute(adapters.where(*bounds).limit(limit)).all()
    if not page:
        return []
    if limit is not None:
        bounds.append(key <= tuple_(page[-1].tenant, page[-1].adapter))
    versions = (
        select(v.adapter_id, v.version, v.method, v.served_by)
        .select_from(VERSION_FROM)
        .where(*bounds)
        .order_by(v.adapter_id, v.version)
    )
    aliases = (
        select(a.adapter_id, a.alias, v.version)
        .select_from(
            t.aliases.join(t.versions, v.id == a.version_id)
            .join(t.adapters, t.adapters.c.id == a.adapter_id)
            .join(t.tenants, t.tenants.c.id == t.adapters.c.tenant_id)
        )
        .where(*bounds)
        .order_by(a.adapter_id, a.alias)
    )
    pointing: dict[int, dict[str, int]] = {}
    for row in conn.execute(aliases):
        pointing.setdefault(row.adapter_id, {})[row.alias] = row.version
    grouped: dict[int, list[Row]] = {}
    for row in conn.execute(versions):
        grouped.setdefault(row.adapter_id, []).append(row)
    return [
        {
            "adapter": f"{p.tenant}/{p.adapter}",
            "tenant": p.tenant,
            "name": p.adapter,
            "versions": [r.version for r in grouped[p.id]],
            "latest": grouped[p.id][-1].version,
            "method": grouped[p.id][-1].method,
            "served_by": grouped[p.id][-1].served_by,
            "aliases": pointing.get(p.id, {}),
        }
        for p in page
        if p.id in grouped
    ]
