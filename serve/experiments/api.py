"""The A/B experiments' HTTP API: create, list, report, reweigh, promote and stop experiments, and
take feedback on the responses they routed. Every change is live on this gateway at once (the
``Traffic`` is refreshed), and on the others within a second."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapterdeck.registry import NotFound
from adapterdeck.registry.experiments import THUMBS
from adapterdeck.registry.experiments.model import parse_retention, parse_settings
from adapterdeck.registry.refs import parse_adapter
from adapterdeck.registry.tenants import Principal
from adapterdeck.serve.auth import Caller
from adapterdeck.serve.experiments.traffic import Traffic
from adapterdeck.serve.metrics import Metrics


class CandidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str = Field(description="vN, @N, base, or tenant/name[@N|:alias] of the same tenant")
    weight: float = Field(ge=0, le=100, description="percent of the traffic")


class GuardrailBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field(description="error_rate, latency_p95, completion_tokens or a live evaluator")
    margin: Any = Field(description="how much worse is tolerated (see docs/api.md)")


class RetentionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_age: Any = Field(default=None, description="seconds, or a duration such as 12h or 7d")
    max_responses: Any = Field(default=None, description="how many recorded responses are kept")


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the public name tenant/name that clients call")
    control: str
    candidates: list[CandidateBody] = Field(min_length=1)
    shadow: str | None = None
    guardrails: list[GuardrailBody] = Field(default_factory=list)
    auto_promote: bool = False
    evaluators: list[str] = Field(default_factory=list, description="reference-free live evaluators")
    eval_sample: Any = Field(default=1.0, description="the share of answers the evaluators score")
    retention: RetentionBody | None = Field(
        default=None, description="how long recorded responses are kept (aggregates stay)"
    )


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


def router(traffic: Traffic, metrics: Metrics) -> APIRouter:
    """The experiment endpoints, on ``traffic`` (its store, and its refresh after a change)."""
    api = APIRouter()
    store = traffic.store

    def owned(name: str, who: Principal) -> str:
        ref = parse_adapter(name)
        if not who.may_use(ref.tenant):  # the same answer as an unknown experiment
            raise NotFound(f"no experiment on {ref.adapter}")
        return ref.adapter

    async def changed() -> None:
        await traffic.refresh()  # live at once on this gateway

    @api.get("/v1/experiments")
    async def list_experiments(who: Caller) -> dict[str, Any]:
        rows = await asyncio.to_thread(store.list, None if who.is_admin else who.tenant)
        return {"object": "list", "data": [e.to_dict() for e in rows]}

    @api.post("/v1/experiments", status_code=201)
    async def create(body: CreateBody, who: Caller) -> dict[str, Any]:
        name = owned(body.name, who)
        candidates = [(c.ref, c.weight) for c in body.candidates]
        settings = parse_settings(
            [(g.metric, g.margin) for g in body.guardrails],
            auto_promote=body.auto_promote,
            evaluators=body.evaluators,
            eval_sample=body.eval_sample,
            retention=parse_retention(body.retention.max_age, body.retention.max_responses)
            if body.retention
            else None,
        )
        experiment = await asyncio.to_thread(
            store.create, name, body.control, candidates, body.shadow, _actor(who), settings
        )
        await changed()
        return experiment.to_dict()

    @api.get("/v1/experiments/{tenant}/{name}")
    async def show(tenant: str, name: str, who: Caller) -> dict[str, Any]:
        await traffic.flush()
        return await asyncio.to_thread(traffic.store.report, owned(f"{tenant}/{name}", who))

    @api.post("/v1/experiments/{tenant}/{name}/weights")
    async def set_weight(tenant: str, name: str, body: WeightBody, who: Caller) -> dict[str, Any]:
        adapter = owned(f"{tenant}/{name}", who)
        experiment = await asyncio.to_thread(
            store.set_weight, adapter, body.variant, body.weight, _actor(who)
        )
        await changed()
        return experiment.to_dict()

    @api.post("/v1/experiments/{tenant}/{name}/promote")
    async def promote(tenant: str, name: str, body: VariantBody, who: Caller) -> Any:
        adapter = owned(f"{tenant}/{name}", who)
        experiment = await asyncio.to_thread(store.promote, adapter, body.variant, _actor(who))
        await changed()
        return experiment.to_dict()

    @api.post("/v1/experiments/{tenant}/{name}/stop")
    async def stop(tenant: str, name: str, who: Caller) -> dict[str, Any]:
        experiment = await asyncio.to_thread(store.stop, owned(f"{tenant}/{name}", who), _actor(who))
        await changed()
        return experiment.to_dict()

    @api.post("/v1/feedback")
    async def feedback(body: FeedbackBody, who: Caller) -> dict[str, Any]:
        if traffic.has_pending(body.response_id):
            await traffic.flush()
        score = body.score if body.score is not None else THUMBS[body.thumbs or "up"]
        tenant = None if who.is_admin else who.tenant
        result = await asyncio.to_thread(traffic.store.feedback, body.response_id, score, tenant)
        metrics.feedback.labels(result["experiment"], result["variant"]).inc()
        metrics.feedback_score.labels(result["experiment"], result["variant"]).inc(score)
        return {"object": "feedback", **result}

    return api
