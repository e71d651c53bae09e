"""FastAPI dependencies for who is calling: ``Caller`` (any valid key) and ``AdminCaller``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapterdeck.registry.tenants import Principal
from adapterdeck.serve.errors import forbidden


async def _principal(request: Request) -> Principal:
    return await request.app.state.gateway.principal(request)


Caller = Annotated[Principal, Depends(_principal)]


def _admin(who: Caller) -> Principal:
    if not who.is_admin:
        raise forbidden("This needs an admin key.")
    return who


AdminCaller = Annotated[Principal, Depends(_admin)]
