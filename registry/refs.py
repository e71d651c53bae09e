"""Adapter names and references: ``tenant/name``, ``tenant/name@N``, ``tenant/name:alias``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterdeck.core.errors import AdapterdeckError

# Lowercase letters, digits, '-', '_' and single dots inside: no path separators, no '..'.
_PART = r"[a-z0-9](?:[a-z0-9_-]|\.(?!\.))*"
TENANT_RE = re.compile(rf"^{_PART}$")
NAME_RE = TENANT_RE
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
TENANT_MAX, NAME_MAX, ALIAS_MAX = 40, 64, 32
DEFAULT_ALIAS = "prod"


class InvalidRef(AdapterdeckError):
    """A name or reference that breaks the naming rules."""


def _check(kind: str, value: str, pattern: re.Pattern[str], limit: int) -> str:
    rule = (
        "lowercase letters, digits, '-', '_' and single dots, starting with a letter or digit"
        if pattern is not ALIAS_RE
        else "lowercase letters, digits, '-' and '_', starting with a letter"
    )
    if not value:
        raise InvalidRef(f"{kind} is empty")
    if len(value) > limit:
        raise InvalidRef(f"{kind} {value!r} is {len(value)} characters long; the limit is {limit}")
    if not pattern.fullmatch(value) or value.endswith("."):
        raise InvalidRef(f"{kind} {value!r} is not valid: use {rule}")
    return value


def check_tenant(value: str) -> str:
    return _check("tenant", value, TENANT_RE, TENANT_MAX)


def check_name(value: str) -> str:
    return _check("adapter name", value, NAME_RE, NAME_MAX)


def check_alias(value: str) -> str:
    return _check("alias", value, ALIAS_RE, ALIAS_MAX)


@dataclass(frozen=True)
class Ref:
    """A parsed reference. At most one of ``version`` and ``alias`` is set."""

    tenant: str
    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def adapter(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def immutable(self) -> bool:
        return self.version is not None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.adapter}@{self.version}"
        if self.alias is not None:
            return f"{self.adapter}:{self.alias}"
        return self.adapter


def parse_ref(text: str) -> Ref:
    """Parse ``tenant/name``, ``tenant/name@N`` or ``tenant/name:alias``, or explain what is wrong."""
    if not isinstance(text, str):
        raise InvalidRef(f"a reference must be a string, got {type(text).__name__}")
    head, version, alias = text, None, None
    if "@" in text:
        head, _, number = text.partition("@")
        if not (number.isascii() and number.isdigit()) or int(number) < 1:
            raise InvalidRef(f"{text!r}: the version after '@' must be a positive integer")
        version = int(number)
    elif ":" in text:
        head, _, alias = text.partition(":")
        check_alias(alias)
    tenant, sep, name = head.partition("/")
    if not sep:
        raise InvalidRef(f"{text!r}: expected tenant/name, tenant/name@N or tenant/name:alias")
    return Ref(check_tenant(tenant), check_name(name), version, alias)


def parse_adapter(text: str) -> Ref:
    """Parse a plain ``tenant/name`` (no version, no alias)."""
    ref = parse_ref(text)
    if ref.version is not None or ref.alias is not None:
        raise InvalidRef(f"{text!r}: expected tenant/name without a version or alias")
    return ref
