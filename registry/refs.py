"""Adapter names and references: ``tenant/name``, ``tenant/name@N``, ``tenant/name:alias``.

Names end up in URLs, file names of vLLM's cache and log lines, so they are plain ASCII: a name
that merely looks like another (a Cyrillic 'а', a fullwidth letter, a combining mark) is refused,
never normalized into it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import shown

# Lowercase letters, digits, '-', '_' and single dots inside: no path separators, no '..'.
_PART = r"[a-z0-9](?:[a-z0-9_-]|\.(?!\.))*"
TENANT_RE = re.compile(rf"^{_PART}$")
NAME_RE = TENANT_RE
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
TENANT_MAX, NAME_MAX, ALIAS_MAX = 40, 64, 32
DEFAULT_ALIAS = "prod"
# Names no tenant may have: "admin" labels the admin key's own traffic in /metrics.
RESERVED_TENANTS = frozenset({"admin"})
# Versions are stored as 32-bit integers (SQLite and PostgreSQL alike).
VERSION_MAX = 2**31 - 1
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_ALIAS_CHARS = _NAME_CHARS - {"."}


class InvalidRef(AdapterdeckError):
    """A name or reference that breaks the naming rules."""


def _culprit(value: str, allowed: frozenset[str], first: frozenset[str], dots: bool) -> str:
    """What exactly breaks the rule, for the message."""
    if value[0] not in first and value[0] in allowed:
        return f"it starts with {value[0]!r}"
    for i, char in enumerate(value, start=1):
        if char not in allowed:
            name = unicodedata.name(char, "")
            what = f"{char!r}" if char.isascii() else f"U+{ord(char):04X}"
            return f"{what}{f' {name}' if name else ''} at position {i} is not allowed"
    if dots and ".." in value:
        return f"'..' at position {value.index('..') + 1} is not allowed"
    return "it ends with '.'"


def _check(kind: str, value: str, pattern: re.Pattern[str], limit: int) -> str:
    alias = pattern is ALIAS_RE
    rule = (
        "lowercase letters, digits, '-' and '_', starting with a letter"
        if alias
        else "lowercase letters, digits, '-', '_' and single dots, starting with a letter or digit"
    )
    if not isinstance(value, str):
        raise InvalidRef(f"{kind} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidRef(f"{kind} is empty")
    if len(value) > limit:
        raise InvalidRef(f"{kind} {shown(value)} is {len(value)} characters long; the limit is {limit}")
    if not pattern.fullmatch(value) or value.endswith("."):
        allowed = _ALIAS_CHARS if alias else _NAME_CHARS
        first = frozenset("abcdefghijklmnopqrstuvwxyz") if alias else allowed - {"-", "_", "."}
        why = _culprit(value, allowed, first, dots=not alias)
        raise InvalidRef(f"{kind} {shown(value)} is not valid: use {rule} ({why})")
    return value


def check_tenant(value: str) -> str:
    _check("tenant", value, TENANT_RE, TENANT_MAX)
    if value in RESERVED_TENANTS:
        raise InvalidRef(
            f"tenant name {value!r} is reserved: the admin key's traffic is labelled "
            f'tenant="{value}" in /metrics; choose another name'
        )
    return value


def check_name(value: str) -> str:
    return _check("adapter name", value, NAME_RE, NAME_MAX)


def check_alias(value: str) -> str:
    return _check("alias", value, ALIAS_RE, ALIAS_MAX)


def check_version(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= VERSION_MAX:
        raise InvalidRef(f"version {shown(str(value))} must be a positive integer up to {VERSION_MAX}")
    return value


@dataclass(frozen=True)
class Ref:
    """A reference. At most one of ``version`` and ``alias`` is set; every part is checked on creation,
    so a ``Ref`` built in code obeys the same rules as a parsed one."""

    tenant: str
    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        check_tenant(self.tenant)
        check_name(self.name)
        if self.version is not None:
            check_version(self.version)
        if self.alias is not None:
            check_alias(self.alias)
            if self.version is not None:
                raise InvalidRef("a reference names a version or an alias, not both")

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
        # ASCII digits only ('²' and '١' are digits to str.isdigit), one spelling per version.
        if not (number.isascii() and number.isdigit()) or number.startswith("0"):
            raise InvalidRef(f"{shown(text)}: the version after '@' must be a positive integer")
        if len(number) > len(str(VERSION_MAX)) or int(number) > VERSION_MAX:
            raise InvalidRef(
                f"{shown(text)}: the version after '@' must be a positive integer up to {VERSION_MAX}"
            )
        version = int(number)
    elif ":" in text:
        head, _, alias = text.partition(":")
        check_alias(alias)
    tenant, sep, name = head.partition("/")
    if not sep:
        raise InvalidRef(f"{shown(text)}: expected tenant/name, tenant/name@N or tenant/name:alias")
    return Ref(check_tenant(tenant), check_name(name), version, alias)


def parse_adapter(text: str) -> Ref:
    """Parse a plain ``tenant/name`` (no version, no alias)."""
    ref = parse_ref(text)
    if ref.version is not None or ref.alias is not None:
        raise InvalidRef(f"{shown(text)}: expected tenant/name without a version or alias")
    return ref
