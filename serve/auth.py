"""Who is calling: the FastAPI dependencies ``Caller`` (any valid key) and ``AdminCaller``, and
``UploadGuard``, which authenticates an upload before a byte of its body is read."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Depends, Request

from adapterdeck.registry.tenants import Principal
from adapterdeck.serve.errors import ApiError, forbidden

PRINCIPAL = "adapterdeck.principal"  # where UploadGuard leaves the caller, in the request's state
_PUBLISH = re.compile(r"^/v1/adapters/[^/]+/[^/]+/versions$")


async def _principal(request: Request) -> Principal:
    known = request.scope.get("state", {}).get(PRINCIPAL)
    if known is not None:  # authenticated (and counted against its limits) before the body was read
        return known
    return await request.app.state.gateway.principal(request)


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


class UploadGuard:
    """ASGI middleware: ``POST /v1/files`` and ``POST /v1/adapters/{tenant}/{name}/versions`` are
    authenticated, checked for the caller's role and counted against the tenant's limits from
    their headers alone. FastAPI reads a multipart body before any dependency runs; here a
    request without a valid key (or with the wrong one) is answered at once, and its connection
    closed, without reading its body."""

    def __init__(self, app: Any, gateway: Any) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        upload = scope["type"] == "http" and scope.get("method") == "POST"
        if not upload or not (path == "/v1/files" or _PUBLISH.match(path)):
            await self.app(scope, receive, send)
            return
        try:
            who = await self.gateway.principal(Request(scope))
            if path == "/v1/files":
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
