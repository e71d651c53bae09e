"""Dashboard pages: A/B experiments (variants side by side, the verdict and p-values, the traffic
split and the ratings over time) and their actions: set a weight, promote, stop."""

from __future__ import annotations

from itertools import accumulate
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from adapterdeck.serve.ui.adapters import FormToken, Signed, redirect
from adapterdeck.serve.ui.client import Api, path
from adapterdeck.serve.ui.render import page
from adapterdeck.serve.ui.session import checked

router = APIRouter(prefix="/ui", include_in_schema=False)


def _path(tenant: str, name: str) -> str:
    return path("v1", "experiments", tenant, name)


@router.get("/experiments")
async def experiments(request: Request, who: Signed) -> Response:
    listing = await Api(request, who.key).get("/v1/experiments")
    return page(request, "experiments.html", who, title="Experiments", listing=listing)


def _charts(report: dict[str, Any]) -> dict[str, Any] | None:
    """Over the experiment's life: each variant's share of the requests so far (the traffic
    split, which should settle at the weights) and its mean rating so far."""
    line = report.get("timeline") or {}
    if not line.get("start"):
        return None
    variants, starts = line["variants"], line["start"]
    counts = {n: list(accumulate(v["requests"])) for n, v in variants.items()}
    totals = [sum(c[i] for c in counts.values()) for i in range(len(starts))]
    share = {n: [round(100 * c[i] / totals[i], 1) if totals[i] else None for i in range(len(starts))]
             for n, c in counts.items()}  # fmt: skip
    ratings = {}
    for n, v in variants.items():
        rated = [
            (s * k, k) if s is not None else (0.0, 0)
            for s, k in zip(v["mean_score"], v["rated"], strict=True)
        ]
        sums, seen = list(accumulate(r[0] for r in rated)), list(accumulate(r[1] for r in rated))
        ratings[n] = [round(a / b, 4) if b else None for a, b in zip(sums, seen, strict=True)]
    return {
        "traffic": {
            "x": "time",
            "series": {n: list(zip(starts, ys, strict=True)) for n, ys in share.items()},
        },
        "ratings": {
            "x": "time",
            "series": {n: list(zip(starts, ys, strict=True)) for n, ys in ratings.items()},
        },
    }


@router.get("/experiments/{tenant}/{name}")
async def experiment(request: Request, who: Signed, tenant: str, name: str) -> Response:
    report = await Api(request, who.key).get(_path(tenant, name))
    return page(request, "experiment.html", who, title=report["name"], e=report, charts=_charts(report))


async def _act(
    request: Request, tenant: str, name: str, action: str, csrf: str | None, body: Any
) -> Response:
    who = await checked(request, csrf)
    await Api(request, who.key).post(f"{_path(tenant, name)}/{action}", body)
    return redirect(path("ui", "experiments", tenant, name))


@router.post("/experiments/{tenant}/{name}/weights")
async def set_weight(
    request: Request,
    tenant: str,
    name: str,
    variant: Annotated[str, Form()],
    weight: Annotated[float, Form()],
    csrf: FormToken = None,
) -> Response:
    return await _act(request, tenant, name, "weights", csrf, {"variant": variant, "weight": weight})


@router.post("/experiments/{tenant}/{name}/promote")
async def promote(
    request: Request, tenant: str, name: str, variant: Annotated[str, Form()], csrf: FormToken = None
) -> Response:
    return await _act(request, tenant, name, "promote", csrf, {"variant": variant})


@router.post("/experiments/{tenant}/{name}/stop")
async def stop(request: Request, tenant: str, name: str, csrf: FormToken = None) -> Response:
    return await _act(request, tenant, name, "stop", csrf, {})
