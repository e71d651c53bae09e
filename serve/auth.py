"""Who is calling: API keys (``Keys``: a short-lived cache, and through a database outage the
last answer for each key), the FastAPI dependencies ``Caller`` (any valid key) and
``AdminCaller``, and ``UploadGuard``, which authenticates an upload before a byte of its body is
read."""

from __future__ import annotations

import re
import time
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, Request

from adapterdeck.registry import Registry
from adapterdeck.registry.cache import Lru
from adapterdeck.registry.tenants import Principal, authenticate
from adapterdeck.serve.errors import ApiError, forbidden, unauthorized
from adapterdeck.serve.limits import UI_UPLOAD, Limiter
from adapterdeck.serve.outage import DatabaseStatus, Remembered

UI_COOKIE = "adapterdeck_ui"  # the dashboard's session cookie (serve/ui/session.py): the API key
PRINCIPAL = "adapterdeck.principal"  # where UploadGuard leaves the caller, in the request's state
KEY_TTL = 10.0  # a revoked key stops working within this many seconds
CACHED_KEYS = 10_000
_PUBLISH = re.compile(r"^/v1/adapters/[^/]+/[^/]+/versions$")


def bearer_key(request: Request) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header, or None."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


class Keys:
    """API keys to principals, for ``KEY_TTL`` seconds; the last answer for a key while the
    database cannot be reached. ``principal`` also counts the request against its tenant's
    per-minute limit."""

    def __init__(self, registry: Registry, database: DatabaseStatus, limiter: Limiter) -> None:
        self.registry, self.database, self.limiter = registry, database, limiter
        self._cached: Lru[str, tuple[float, Principal]] = Lru(CACHED_KEYS)
        self._last = Remembered(CACHED_KEYS)

    async def principal(self, request: Request) -> Principal:
        key = bearer_key(request)
        if key is None:
            raise unauthorized()
        who = await self.authenticate(key)
        if who.tenant is not None:
            await self.limiter.check(who.tenant)
        return who

    async def authenticate(self, key: str) -> Principal:
        now = time.monotonic()
        cached = self._cached.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self.database.fetch(partial(authenticate, self.registry, key), key, self._last)
        if found is None:
            raise unauthorized("Invalid API key.")
        self._cached[key] = (now + KEY_TTL, found)
        return found

    async def is_admin(self, request: Request) -> bool:
        """True for a valid admin key; False for anything else, a missing key included."""
        key = bearer_key(request)
        if key is None:
            return False
        try:
            return (await self.authenticate(key)).is_admin
        except ApiError:
            return False


async def _principal(request: Request) -> Principal:
    known = request.scope.get("state", {}).get(PRINCIPAL)
    if known is not None:  # authenticated (and counted against its limits) before the body was read
        return known
    keys: Keys = request.app.state.keys
    return await keys.principal(request)


Caller = Annotated[Principal, Depends(_principal)]


def _admin(who: Caller) -> Principal:
    if not who.is_admin:
        raise forbidden("This needs an admin key.")
    return who


AdminCaller = Annotated[Principal, Depends(_admin)]


def tenant_only(who: Principal, what: str) -> str:
    if who.tenant is None:
        raise forbidden(f"{what} belong to a tenant: use the tenant's API key.")
    return who.tenant


def _with_bearer(scope: dict[str, Any], key: str) -> Request:
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"authorization"]
    return Request({**scope, "headers": [*headers, (b"authorization", f"Bearer {key}".encode())]})


class UploadGuard:
    """ASGI middleware: ``POST /v1/files``, ``POST /v1/adapters/{tenant}/{name}/versions`` and the
    dashboard's upload (``POST /ui/jobs``, with the key of its session cookie) are authenticated,
    checked for the caller's role and counted against the tenant's limits from their headers
    alone. FastAPI reads a multipart body before any dependency runs; here a request without a
    valid key (or with the wrong one) is answered at once, and its connection closed, without
    reading its body."""

    def __init__(self, app: Any, keys: Keys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        upload = scope["type"] == "http" and scope.get("method") == "POST"
        if not upload or not (path in ("/v1/files", UI_UPLOAD) or _PUBLISH.match(path)):
            await self.app(scope, receive, send)
            return
        try:
            request = Request(scope)
            if path == UI_UPLOAD:  # the dashboard's upload: its session cookie holds the key
                request = _with_bearer(scope, request.cookies.get(UI_COOKIE, ""))
            who = await self.keys.principal(request)
            if path in ("/v1/files", UI_UPLOAD):
                tenant_only(who, "Files")
            elif not who.is_admin:
                raise forbidden("This needs an admin key.")
        except ApiError as exc:
            response = exc.response()
            response.headers["connection"] = "close"  # the unread body is never read
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[PRINCIPAL] = who
        await self.app(scope, receive, send)
