"""A/B experiments in the gateway: routing, shadow copies, recording, feedback and the HTTP API.

The gateway keeps every running experiment in memory and, every ``INTERVAL`` seconds, re-reads them
from the registry database (so a change made anywhere, the CLI or another gateway, is live within
a second; a change made through this gateway's own API is live at once) and writes the requests
served since in one batch (feedback on a response not yet written flushes first). When the
database cannot be reached the last known experiments keep routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapterdeck.registry import NotFound, Registry
from adapterdeck.registry.experiments import THUMBS, Experiment, Experiments
from adapterdeck.registry.refs import parse_adapter
from adapterdeck.registry.tenants import Principal
from adapterdeck.serve.auth import Caller

logger = logging.getLogger("adapterdeck.serve.experiments")
INTERVAL = 0.25
SHADOW_CONCURRENCY = 16
MAX_PENDING = 100_000
USER_HEADER = "x-user-id"


def user_id(body: dict[str, Any], request: Request) -> str | None:
    """Who the caller is, for sticky assignment: ``user``, else ``X-User-Id``, else the API key."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    header = request.headers.get(USER_HEADER)
    if header:
        return f"user:{header}"
    key = request.headers.get("authorization", "").partition(" ")[2].strip()
    return "key:" + hashlib.sha256(key.encode()).hexdigest() if key else None


class Traffic:
    """Running experiments (refreshed from the database) and the recorder of their requests."""

    def __init__(self, registry: Registry) -> None:
        self.store = Experiments(registry)
        self.running: dict[str, Experiment] = {}
        self.pending: list[dict[str, Any]] = []
        self.shadow_slots = asyncio.Semaphore(SHADOW_CONCURRENCY)
        self.shadow_tasks: set[asyncio.Task[Any]] = set()
        self.database_ok = True
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._loop_task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self.shadow_tasks:
            await asyncio.wait(self.shadow_tasks, timeout=30)
        await self.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            await self.refresh()
            await self.flush()

    async def refresh(self) -> None:
        try:
            self.running = await asyncio.to_thread(self.store.running)
        except Exception as exc:  # keep routing with what we know
            if self.database_ok:
                logger.warning("cannot read experiments (routing with the last known): %s", exc)
            self.database_ok = False
        else:
            self.database_ok = True

    def lookup(self, adapter: str) -> Experiment | None:
        return self.running.get(adapter)

    def note(self, row: dict[str, Any]) -> None:
        if len(self.pending) < MAX_PENDING:
            self.pending.append({**row, "at": datetime.now(UTC)})

    def has_pending(self, response_id: str) -> bool:
        return any(r["response_id"] == response_id for r in self.pending)

    async def flush(self) -> None:
        rows, self.pending = self.pending, []
        if not rows:
            return
        try:
            await asyncio.to_thread(self.store.record, rows)
        except Exception as exc:
            logger.warning("cannot record %d experiment requests (will retry): %s", len(rows), exc)
            self.pending = (rows + self.pending)[:MAX_PENDING]


# -- the HTTP API ----------------------------------------------------------------------------------


class CandidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str = Field(description="vN, @N, base, or tenant/name[@N|:alias] of the same tenant")
    weight: float = Field(ge=0, le=100, description="percent of the traffic")


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the public name tenant/name that clients call")
    control: str
    candidates: list[CandidateBody] = Field(min_length=1)
    shadow: str | None = None


class WeightBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str
    weight: float = Field(ge=0, le=100)


class VariantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=128)
    score: float | None = Field(default=None, allow_inf_nan=False)
    thumbs: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _one(self) -> FeedbackBody:
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of 'score' (a number) and 'thumbs' ('up' or 'down')")
        return self


def _actor(who: Principal) -> str:
    return who.tenant or "admin"


def router() -> APIRouter:
    """The experiment endpoints; ``request.app.state.gateway`` holds the ``Traffic``."""
    api = APIRouter()

    def owned(name: str, who: Principal) -> str:
        ref = parse_adapter(name)
        if not who.may_use(ref.tenant):  # the same answer as an unknown experiment
            raise NotFound(f"no experiment on {ref.adapter}")
        return ref.adapter

    async def changed(request: Request) -> None:
        await request.app.state.gateway.traffic.refresh()  # live at once on this gateway

    @api.get("/v1/experiments")
    async def list_experiments(request: Request, who: Caller) -> dict[str, Any]:
        store = request.app.state.gateway.traffic.store
        rows = await asyncio.to_thread(store.list, None if who.is_admin else who.tenant)
        return {"object": "list", "data": [e.to_dict() for e in rows]}

    @api.post("/v1/experiments", status_code=201)
    async def create(body: CreateBody, request: Request, who: Caller) -> dict[str, Any]:
        store = request.app.state.gateway.traffic.store
        name = owned(body.name, who)
        candidates = [(c.ref, c.weight) for c in body.candidates]
        experiment = await asyncio.to_thread(
            store.create, name, body.control, candidates, body.shadow, _actor(who)
        )
        await changed(request)
        return experiment.to_dict()

    @api.get("/v1/experiments/{tenant}/{name}")
    async def show(tenant: str, name: str, request: Request, who: Caller) -> dict[str, Any]:
        traffic = request.app.state.gateway.traffic
        await traffic.flush()
        return await asyncio.to_thread(traffic.store.report, owned(f"{tenant}/{name}", who))

    @api.post("/v1/experiments/{tenant}/{name}/weights")
    async def set_weight(
        tenant: str, name: str, body: WeightBody, request: Request, who: Caller
    ) -> dict[str, Any]:
        store = request.app.state.gateway.traffic.store
        adapter = owned(f"{tenant}/{name}", who)
        experiment = await asyncio.to_thread(
            store.set_weight, adapter, body.variant, body.weight, _actor(who)
        )
        await changed(request)
        return experiment.to_dict()

    @api.post("/v1/experiments/{tenant}/{name}/promote")
    async def promote(tenant: str, name: str, body: VariantBody, request: Request, who: Caller) -> Any:
        store = request.app.state.gateway.traffic.store
        adapter = owned(f"{tenant}/{name}", who)
        experiment = await asyncio.to_thread(store.promote, adapter, body.variant, _actor(who))
        await changed(request)
        return experiment.to_dict()

    @api.post("/v1/experiments/{tenant}/{name}/stop")
    async def stop(tenant: str, name: str, request: Request, who: Caller) -> dict[str, Any]:
        store = request.app.state.gateway.traffic.store
        experiment = await asyncio.to_thread(store.stop, owned(f"{tenant}/{name}", who), _actor(who))
        await changed(request)
        return experiment.to_dict()

    @api.post("/v1/feedback")
    async def feedback(body: FeedbackBody, request: Request, who: Caller) -> dict[str, Any]:
        gateway = request.app.state.gateway
        traffic: Traffic = gateway.traffic
        if traffic.has_pending(body.response_id):
            await traffic.flush()
        score = body.score if body.score is not None else THUMBS[body.thumbs or "up"]
        tenant = None if who.is_admin else who.tenant
        result = await asyncio.to_thread(traffic.store.feedback, body.response_id, score, tenant)
        gateway.metrics.feedback.labels(result["experiment"], result["variant"]).inc()
        gateway.metrics.feedback_score.labels(result["experiment"], result["variant"]).inc(score)
        return {"object": "feedback", **result}

    return api
