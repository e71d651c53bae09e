"""Dashboard pages: sign-in and sign-out, the adapters (versions, aliases and their history), a
version with its run report (loss curves, base vs prompted vs tuned, samples, lineage), and
moving an alias (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from adapterdeck.serve.errors import ApiError
from adapterdeck.serve.ui.client import Api, path
from adapterdeck.serve.ui.render import HEADERS, page
from adapterdeck.serve.ui.session import Session, checked, session, sign_in, sign_out

router = APIRouter(prefix="/ui", include_in_schema=False)
Signed = Annotated[Session, Depends(session)]
FormToken = Annotated[str | None, Form(alias="csrf")]
PAGE = 100


def redirect(url: str) -> Response:
    response = RedirectResponse(url, status_code=303)
    response.headers.update(HEADERS)
    return response


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard page only (never another site)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/adapters"


@router.get("")
@router.get("/")
async def home() -> Response:
    return redirect("/ui/adapters")


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    return page(request, "login.html", None, title="Sign in", next=safe_next(next))


@router.post("/login")
async def login(
    request: Request, key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = ""
) -> Response:
    try:
        await request.app.state.keys.authenticate(key.strip())
    except ApiError:
        return page(request, "login.html", None, status=401, title="Sign in", next=safe_next(next),
                    message="That key is not valid.")  # fmt: skip
    response = redirect(safe_next(next))
    sign_in(response, request, key.strip())
    return response


@router.post("/logout")
async def logout(request: Request, csrf: FormToken = None) -> Response:
    await checked(request, csrf)
    response = redirect("/ui/login")
    sign_out(response, request)
    return response


@router.get("/adapters")
async def adapters(request: Request, who: Signed, after: str | None = None) -> Response:
    listing = await Api(request, who.key).get("/v1/adapters", limit=PAGE, after=after)
    return page(request, "adapters.html", who, title="Adapters", listing=listing, after=after)


def _path(tenant: str, name: str) -> str:
    return path("v1", "adapters", tenant, name)


@router.get("/adapters/{tenant}/{name}")
async def adapter(request: Request, who: Signed, tenant: str, name: str) -> Response:
    api = Api(request, who.key)
    found = await api.get(_path(tenant, name))
    pins = await api.get("/v1/pins", tenant=tenant if who.who.is_admin else None)
    pinned = [p for p in pins["data"] if p["tenant"] == tenant and p["name"] == name]
    return page(request, "adapter.html", who, title=f"{tenant}/{name}", adapter=found, pinned=pinned)


@router.get("/adapters/{tenant}/{name}/versions/{version}")
async def version(request: Request, who: Signed, tenant: str, name: str, version: int) -> Response:
    api = Api(request, who.key)
    info = await api.get(f"{_path(tenant, name)}/versions/{version}")
    report = await api.maybe(f"{_path(tenant, name)}/versions/{version}/report")
    return page(
        request, "version.html", who, title=info["ref"], info=info, report=report,
        curves=_curves(report), metrics=_metrics(report),
    )  # fmt: skip


def _curves(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The loss curves for the chart: training and validation loss by step."""
    training = (report or {}).get("training") or {}
    train, val = training.get("train_loss") or [], training.get("val_loss") or []
    if not train and not val:
        return None
    return {
        "series": {
            "training loss": [[p["step"], p["loss"]] for p in train],
            "validation loss": [[p["step"], p["loss"]] for p in val],
        },
        "x": "step",
    }


def _metrics(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per evaluator: base, base with examples in its prompt, tuned, and the change."""
    found = ((report or {}).get("test") or {}).get("metrics") or {}
    rows = []
    for name, entry in found.items():
        if not isinstance(entry, dict):
            continue
        value = {k: (entry.get(k) or {}).get("value") for k in ("base", "base_few_shot", "tuned")}
        rows.append(
            {"name": name, **value, "delta": entry.get("delta"), "higher": entry.get("higher_is_better")}
        )
    return rows


@router.post("/adapters/{tenant}/{name}/aliases")
async def move_alias(
    request: Request,
    tenant: str,
    name: str,
    alias: Annotated[str, Form()],
    version: Annotated[int, Form()],
    csrf: FormToken = None,
) -> Response:
    who = await checked(request, csrf)
    await Api(request, who.key).call("PUT", _path(tenant, name) + path("aliases", alias),
                                     json={"version": version})  # fmt: skip
    return redirect(path("ui", "adapters", tenant, name))
