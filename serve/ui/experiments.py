"""Dashboard pages: A/B experiments (variants side by side, the verdict and p-values, the traffic
split and the ratings over time) and their actions: set a weight, promote, stop."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from adapterdeck.serve.ui.adapters import FormToken, Signed, redirect
from adapterdeck.serve.ui.client import Api
from adapterdeck.serve.ui.render import page
from adapterdeck.serve.ui.session import checked

router = APIRouter(prefix="/ui", include_in_schema=False)


def _path(tenant: str, name: str) -> str:
    return f"/v1/experiments/{quote(tenant, safe='')}/{quote(name, safe='')}"


@router.get("/experiments")
async def experiments(request: Request, who: Signed) -> Response:
    listing = await Api(request, who.key).get("/v1/experiments")
    return page(request, "experiments.html", who, title="Experiments", listing=listing)


def _charts(report: dict[str, Any]) -> dict[str, Any] | None:
    """Requests per variant and the mean rating per variant over the experiment's life."""
    line = report.get("timeline") or {}
    if not line.get("start"):
        return None
    variants = line["variants"]
    return {
        "traffic": {
            "x": "time",
            "series": {n: list(zip(line["start"], v["requests"], strict=True)) for n, v in variants.items()},
        },
        "ratings": {
            "x": "time",
            "series": {
                n: list(zip(line["start"], v["mean_score"], strict=True)) for n, v in variants.items()
            },
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
    return redirect(f"/ui/experiments/{quote(tenant, safe='')}/{quote(name, safe='')}")


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
