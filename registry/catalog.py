"""The catalog: every model name a caller may put in ``model`` (what ``/v1/models`` lists), page by
page, in one query whatever the registry holds.

For each adapter that has a version, in the order of (tenant, name): ``tenant/name``, then
``tenant/name@N`` for each version, then ``tenant/name:alias`` for each alias; after a tenant's
adapters, its fine-tuned models and checkpoints (``ft:...``). The order is total and is computed
from the name alone, so a page ends at a name and the next one starts after it (a keyset cursor):
a publish or a delete between two pages shifts nothing already seen. Its own module because it
reads the fine-tuning tables too, which ``registry.py`` must not import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, String, exists, literal_column, select, tuple_, union_all

import adapterdeck.registry.schema as t
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry.db import Page
from adapterdeck.registry.finetune.names import SUCCEEDED, epoch, named_tenant
from adapterdeck.registry.refs import InvalidRef, parse_ref
from adapterdeck.registry.registry import Registry

ADAPTERS, FINE_TUNED = 0, 1  # the groups within a tenant
BARE, VERSION, ALIAS = 0, 1, 2  # the kinds of an adapter's names
Key = tuple[str, int, str, int, int, str]  # tenant, group, name, kind, version, alias


@dataclass(frozen=True)
class ModelName:
    id: str
    owned_by: str
    created: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}


def cursor_key(name: str) -> Key:
    """Where ``name`` sits in the catalog's order (it need not exist); a name that could never be
    in the catalog is the caller's mistake."""
    if name.startswith("ft:"):
        tenant = named_tenant(name)
        if tenant is None:
            raise AdapterdeckError(f"{name[:80]!r} is not a model name this gateway lists")
        return (tenant, FINE_TUNED, name, 0, 0, "")
    try:
        ref = parse_ref(name)
    except InvalidRef as exc:
        raise AdapterdeckError(f"'after' must be a model id from a previous page: {exc}") from None
    if ref.version is not None:
        return (ref.tenant, ADAPTERS, ref.name, VERSION, ref.version, "")
    if ref.alias is not None:
        return (ref.tenant, ADAPTERS, ref.name, ALIAS, 0, ref.alias)
    return (ref.tenant, ADAPTERS, ref.name, BARE, 0, "")


COLUMNS = ("tenant", "grp", "name", "kind", "version", "alias", "created")


def _row(*values: Any) -> list[Any]:
    """One select's columns, named alike in every part of the union."""
    out = []
    for label, value in zip(COLUMNS, values, strict=True):
        if isinstance(value, int):
            value = literal_column(str(value), Integer)
        elif isinstance(value, str):
            value = literal_column("''", String)
        out.append(value.label(label))
    return out


def _names(tenant: str | None, from_tenant: str | None) -> Any:
    """Every catalog row: the union of one select per kind of name."""
    tenants, adapters, versions, aliases = t.tenants.c, t.adapters.c, t.versions.c, t.aliases.c
    jobs, checkpoints = t.ft_jobs.c, t.ft_checkpoints.c
    owned = t.adapters.join(t.tenants, tenants.id == adapters.tenant_id)
    job_from = t.ft_jobs.join(t.tenants, tenants.id == jobs.tenant_id)
    parts = [
        select(*_row(tenants.name, ADAPTERS, adapters.name, BARE, 0, "", adapters.created_at))
        .select_from(owned)
        .where(exists().where(versions.adapter_id == adapters.id)),
        select(
            *_row(tenants.name, ADAPTERS, adapters.name, VERSION, versions.version, "", versions.created_at)
        ).select_from(t.versions.join(owned, adapters.id == versions.adapter_id)),
        select(
            *_row(tenants.name, ADAPTERS, adapters.name, ALIAS, 0, aliases.alias, aliases.updated_at)
        ).select_from(t.aliases.join(owned, adapters.id == aliases.adapter_id)),
        select(*_row(tenants.name, FINE_TUNED, jobs.fine_tuned_model, BARE, 0, "", jobs.finished_at))
        .select_from(job_from)
        .where(jobs.status == SUCCEEDED, jobs.fine_tuned_model.is_not(None)),
        select(*_row(tenants.name, FINE_TUNED, checkpoints.name, BARE, 0, "", checkpoints.created_at))
        .select_from(t.ft_checkpoints.join(job_from, jobs.id == checkpoints.job_id))
        .where(jobs.status == SUCCEEDED),
    ]
    if tenant is not None:
        parts = [p.where(tenants.name == tenant) for p in parts]
    if from_tenant is not None:  # each part skips the tenants the cursor is past
        parts = [p.where(tenants.name >= from_tenant) for p in parts]
    return union_all(*parts).subquery("names")


def model_names(registry: Registry, tenant: str | None, *, after: str | None, limit: int) -> Page:
    """Up to ``limit`` catalog names (of one tenant, or all) past ``after``; ``has_more`` tells
    whether another page follows. One query."""
    key = cursor_key(after) if after is not None else None
    names = _names(tenant, key[0] if key else None)
    order = [names.c[c] for c in COLUMNS[:-1]]
    query = select(*order, names.c.created).order_by(*order).limit(limit + 1)
    if key is not None:
        query = query.where(tuple_(*order) > tuple_(*key))
    with registry.engine.connect() as conn:
        rows = conn.execute(query).all()
    items = [_model_name(row) for row in rows[:limit]]
    return Page(items, len(rows) > limit)


def _model_name(row: Any) -> ModelName:
    tenant, group, name, kind, version, alias, created = row
    if group == FINE_TUNED:
        model = name
    elif kind == VERSION:
        model = f"{tenant}/{name}@{version}"
    elif kind == ALIAS:
        model = f"{tenant}/{name}:{alias}"
    else:
        model = f"{tenant}/{name}"
    return ModelName(model, tenant, epoch(created) or 0)
