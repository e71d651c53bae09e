"""Pinned aliases: ``tenant/name:alias`` whose current version every gateway keeps loaded on its
replicas, so that no request to it waits for a cold load (``serve/fleet/pins.py`` does the
loading).

A pin names an alias, never a version: when the alias moves, the pin moves with it, and the
version moving into service is loaded before clients are sent to it. A bare ``tenant/name`` pins
its ``prod`` alias (the version a bare name is served from whenever ``prod`` is set). The alias
must exist when it is pinned; a version an alias points at cannot be deleted (the registry's alias
rule), so a pin always has a version to load, and the pins of an adapter go with its row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, and_, select, update

import adapterdeck.registry.schema as t
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import shown
from adapterdeck.registry.db import iso, now, write_transaction
from adapterdeck.registry.errors import NotFound
from adapterdeck.registry.refs import DEFAULT_ALIAS, Ref, check_tenant, parse_ref
from adapterdeck.registry.registry import Registry

MAX_REPLICAS = 1024


@dataclass(frozen=True)
class Pin:
    """A pinned alias, with the version it points at now (``ref``, ``tenant/name@N``) and the
    engines that version can be served by."""

    tenant: str
    name: str
    alias: str
    replicas: int | None
    ref: str | None
    served_by: tuple[str, ...]
    created_by: str
    created_at: str
    updated_at: str

    @property
    def pin(self) -> str:
        return f"{self.tenant}/{self.name}:{self.alias}"

    def to_dict(self) -> dict[str, Any]:
        return {"pin": self.pin, **asdict(self), "served_by": list(self.served_by)}


def check_replicas(value: Any) -> int | None:
    """``None`` (as many replicas as the router gives the adapter) or a count from 1 up."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REPLICAS:
        raise AdapterdeckError(
            f"replicas must be a whole number from 1 to {MAX_REPLICAS}, or none for as many as the "
            f"router gives the adapter; got {shown(str(value))}"
        )
    return value


def _pinned_alias(text: str, what: str) -> Ref:
    """``tenant/name:alias`` (a bare ``tenant/name``: its prod alias); an exact version is refused."""
    ref = parse_ref(text)
    if ref.version is not None:
        raise AdapterdeckError(
            f"cannot {what} {ref}: it is an exact version; {what} an alias instead "
            f"({ref.adapter}:ALIAS). A pin follows its alias, so the version the alias moves to is "
            "loaded before its first request; a pinned version would stay loaded after the alias "
            "had moved on"
        )
    return Ref(ref.tenant, ref.name, alias=ref.alias or DEFAULT_ALIAS)


_VERSION = t.versions.alias("pinned_version")
_SELECT = (
    select(
        t.tenants.c.name.label("tenant"),
        t.adapters.c.name.label("adapter"),
        t.adapter_pins,
        _VERSION.c.version,
        _VERSION.c.served_by,
    )
    .select_from(
        t.adapter_pins.join(t.adapters, t.adapters.c.id == t.adapter_pins.c.adapter_id)
        .join(t.tenants, t.tenants.c.id == t.adapters.c.tenant_id)
        .outerjoin(
            t.aliases,
            and_(
                t.aliases.c.adapter_id == t.adapter_pins.c.adapter_id,
                t.aliases.c.alias == t.adapter_pins.c.alias,
            ),
        )
        .outerjoin(_VERSION, _VERSION.c.id == t.aliases.c.version_id)
    )
    .order_by(t.tenants.c.name, t.adapters.c.name, t.adapter_pins.c.alias)
)


def _pin(row: Any) -> Pin:
    return Pin(
        tenant=row.tenant,
        name=row.adapter,
        alias=row.alias,
        replicas=row.replicas,
        ref=f"{row.tenant}/{row.adapter}@{row.version}" if row.version is not None else None,
        served_by=tuple(row.served_by or ()),
        created_by=row.created_by,
        created_at=iso(row.created_at),
        updated_at=iso(row.updated_at),
    )


class Pins:
    """The pinned aliases of a registry: pin, unpin, list, and resolve them all in one query."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.engine = registry.engine

    def pin(self, alias_ref: str, replicas: int | None = None, actor: str = "cli") -> Pin:
        """Pin ``tenant/name:alias`` (bare ``tenant/name``: its prod alias) on ``replicas`` replicas
        (None: the router's k); pinning it again changes its count."""
        ref = _pinned_alias(alias_ref, "pin")
        replicas = check_replicas(replicas)
        with write_transaction(self.engine) as conn:
            adapter_id = self.registry.adapter_id(conn, ref, lock=True)
            self._check_alias(conn, adapter_id, ref, bare=":" not in alias_ref)
            key = and_(t.adapter_pins.c.adapter_id == adapter_id, t.adapter_pins.c.alias == ref.alias)
            if conn.execute(select(t.adapter_pins.c.id).where(key)).first() is None:
                conn.execute(
                    t.adapter_pins.insert().values(
                        adapter_id=adapter_id,
                        alias=ref.alias,
                        replicas=replicas,
                        created_by=actor,
                        created_at=now(),
                        updated_at=now(),
                    )
                )
            else:
                conn.execute(update(t.adapter_pins).where(key).values(replicas=replicas, updated_at=now()))
        return self._one(ref)

    def unpin(self, alias_ref: str) -> Pin:
        """Remove the pin of ``tenant/name:alias``; returns what it was."""
        ref = _pinned_alias(alias_ref, "unpin")
        pinned = self._one(ref)
        with write_transaction(self.engine) as conn:
            adapter_id = self.registry.adapter_id(conn, ref, lock=True)
            conn.execute(
                t.adapter_pins.delete().where(
                    t.adapter_pins.c.adapter_id == adapter_id, t.adapter_pins.c.alias == ref.alias
                )
            )
        return pinned

    def list(self, tenant: str | None = None) -> list[Pin]:
        """Every pin (of one tenant, or all), with the version its alias points at now."""
        query = _SELECT if tenant is None else _SELECT.where(t.tenants.c.name == check_tenant(tenant))
        with self.engine.connect() as conn:
            return [_pin(row) for row in conn.execute(query)]

    def resolved(self) -> list[Pin]:
        """Every pin with the immutable ref its alias points at now, in one query: what each
        gateway polls to find an alias that moved."""
        return self.list()

    def _one(self, ref: Ref) -> Pin:
        query = _SELECT.where(
            t.tenants.c.name == ref.tenant,
            t.adapters.c.name == ref.name,
            t.adapter_pins.c.alias == ref.alias,
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
            if row is None:
                self.registry.adapter_id(conn, ref)  # NotFound for an unknown adapter
                raise NotFound(f"{ref} is not pinned")
        return _pin(row)

    @staticmethod
    def _check_alias(conn: Connection, adapter_id: int, ref: Ref, *, bare: bool) -> None:
        found = conn.execute(
            select(t.aliases.c.version_id).where(
                t.aliases.c.adapter_id == adapter_id, t.aliases.c.alias == ref.alias
            )
        ).first()
        if found is None:
            bare_means = f"a bare {ref.adapter} pins its {DEFAULT_ALIAS} alias, and " if bare else ""
            raise NotFound(
                f"cannot pin {ref}: {bare_means}{ref.adapter} has no alias {ref.alias!r}; point it at "
                f"a version first (adapterdeck registry alias {ref.adapter} {ref.alias} N)"
            )
