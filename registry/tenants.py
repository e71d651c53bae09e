"""Tenants and their API keys. A key is shown once, when it is made; only its sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select

import adapterdeck.registry.schema as t
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.registry.db import ensure_tenant, now, write_transaction
from adapterdeck.registry.errors import NotFound
from adapterdeck.registry.refs import RESERVED_TENANTS, check_tenant
from adapterdeck.registry.registry import Registry

KEY_PREFIX = "adk_"
KEY_LENGTH = len(KEY_PREFIX) + 43  # secrets.token_urlsafe(32) is 43 characters
PREFIX_LENGTH = len(KEY_PREFIX) + 6  # what is stored of a key besides its digest, and shown
ROLE_TENANT, ROLE_ADMIN = "tenant", "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, or an admin (``tenant`` is None)."""

    role: str
    tenant: str | None
    key_prefix: str

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN

    def may_use(self, tenant: str) -> bool:
        return self.is_admin or self.tenant == tenant


def key_digest(key: str) -> str:
    """What is stored of a key: its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(registry: Registry, tenant: str | None) -> str:
    """Create a tenant (if new) and a key for it, or an admin key when ``tenant`` is None."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    if tenant is not None:
        check_tenant(tenant)
    with write_transaction(registry.engine) as conn:
        tenant_id = ensure_tenant(conn, tenant) if tenant is not None else None
        conn.execute(
            t.api_keys.insert().values(
                tenant_id=tenant_id,
                key_sha256=key_digest(key),
                prefix=key[:PREFIX_LENGTH],
                role=ROLE_TENANT if tenant is not None else ROLE_ADMIN,
                created_at=now(),
            )
        )
    return key


def authenticate(registry: Registry, key: str) -> Principal | None:
    """The principal a key belongs to, or None for an unknown or revoked key.

    A tenant key of a reserved name (made before the name was reserved) is refused too: its
    ``/metrics`` would show the admin key's traffic.
    """
    with registry.engine.connect() as conn:
        row = conn.execute(
            select(t.api_keys.c.role, t.api_keys.c.prefix, t.tenants.c.name)
            .select_from(t.api_keys.outerjoin(t.tenants, t.tenants.c.id == t.api_keys.c.tenant_id))
            .where(t.api_keys.c.key_sha256 == key_digest(key), t.api_keys.c.revoked_at.is_(None))
        ).first()
    if row is None or (row.role == ROLE_TENANT and row.name in RESERVED_TENANTS):
        return None
    return Principal(row.role, row.name, row.prefix)


def revoke_key(registry: Registry, key_or_prefix: str) -> int:
    """Revoke the key, or every key that starts with the given first characters; returns how many.

    A whole key names exactly that key; a shorter text is compared on its first ``PREFIX_LENGTH``
    characters (all that is stored of a key besides its digest). Nothing to revoke is an error, so
    a mistyped or too short prefix is never taken for done.
    """
    given = key_or_prefix.strip()
    if len(given) < PREFIX_LENGTH:
        raise AdapterdeckError(
            f"{given!r} is {len(given)} characters; give the key, or at least its first "
            f"{PREFIX_LENGTH} characters ({KEY_PREFIX!r} and {PREFIX_LENGTH - len(KEY_PREFIX)} more)"
        )
    keys = t.api_keys.c
    whole = len(given) >= KEY_LENGTH
    match = keys.key_sha256 == key_digest(given) if whole else keys.prefix == given[:PREFIX_LENGTH]
    with write_transaction(registry.engine) as conn:
        revoked = conn.execute(
            t.api_keys.update().where(match, keys.revoked_at.is_(None)).values(revoked_at=now())
        ).rowcount
    if not revoked:
        shown = f"{given[:PREFIX_LENGTH]}..." if whole else given[:PREFIX_LENGTH]
        what = "the key" if whole else "a key starting with"
        raise NotFound(f"no active key matches {what} {shown!r}; nothing was revoked")
    return revoked
