"""The pins' HTTP API: list the pinned aliases (a tenant its own, the admin all), pin and unpin
(admin). A change is warmed on this gateway at once, and on the others within
``fleet.pin_refresh_seconds``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from adapterdeck.registry.fleet import MAX_REPLICAS, Pin, Pins
from adapterdeck.serve.auth import AdminCaller, Caller
from adapterdeck.serve.fleet.pins import PinWarmer


class PinBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int | None = Field(
        None,
        ge=1,
        le=MAX_REPLICAS,
        strict=True,
        description="replicas that keep the alias's version loaded; null: as many as the router gives it",
    )


def router(pins: Pins, warmer: PinWarmer | None) -> APIRouter:
    """The pin endpoints on ``pins``; ``warmer`` (None when this gateway warms nothing) is told of
    every change and reports what it has loaded."""
    api = APIRouter()

    def shown(pin: Pin) -> dict[str, Any]:
        status = warmer.status(pin.pin) if warmer is not None else {"warm": None, "warm_on": []}
        return {"object": "pin", **pin.to_dict(), **status}

    @api.get("/v1/pins")
    async def list_pins(who: Caller, tenant: str | None = None) -> dict[str, Any]:
        # A tenant key sees its own pins whatever it asks for; only the admin's may pick a tenant.
        rows = await asyncio.to_thread(pins.list, tenant if who.is_admin else who.tenant)
        return {"object": "list", "data": [shown(p) for p in rows]}

    @api.put("/v1/pins/{tenant}/{name}/{alias}")
    async def pin(
        tenant: str, name: str, alias: str, _: AdminCaller, body: PinBody | None = None
    ) -> dict[str, Any]:
        replicas = body.replicas if body is not None else None
        done = await asyncio.to_thread(pins.pin, f"{tenant}/{name}:{alias}", replicas, "admin")
        if warmer is not None:
            warmer.nudge()
        return shown(done)

    @api.delete("/v1/pins/{tenant}/{name}/{alias}")
    async def unpin(tenant: str, name: str, alias: str, _: AdminCaller) -> dict[str, Any]:
        done = await asyncio.to_thread(pins.unpin, f"{tenant}/{name}:{alias}")
        if warmer is not None:
            warmer.nudge()
        return {"object": "pin", **done.to_dict(), "deleted": True}

    return api
