"""The dashboard's pages: templates (Jinja2, every value escaped), the static files, the answers to
a missing session, a forged form and an API error, and the security headers of every page."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Undefined

from adapterdeck.serve.ui.client import ApiFailed
from adapterdeck.serve.ui.session import Forged, Session, SignIn

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")

# Scripts, styles and requests only from the gateway itself; nothing inline, no frames.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def when(value: Any) -> str:
    """An epoch or ISO 8601 time as ``2026-12-01 18:00:00 UTC`` ("" for none)."""
    if value in (None, ""):
        return ""
    if isinstance(value, int | float):
        moment = datetime.fromtimestamp(value, UTC)
    else:
        try:
            moment = datetime.fromisoformat(str(value)).astimezone(UTC)
        except ValueError:
            return str(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def size(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return ""


def number(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, Undefined):
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}g}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def as_json(value: Any) -> str:
    """Data for a page's scripts, as a ``data-spec`` attribute: JSON (NaN as null) that the template
    escapes like any other value, so no value can leave the attribute; the script reads it back
    with ``JSON.parse(element.dataset.spec)``. (Not a ``<script>`` element: htmx drops those from
    the parts of a page it swaps in.)"""
    return json.dumps(_finite(value), default=str, allow_nan=False)


templates.env.filters.update(when=when, size=size, number=number, as_json=as_json, q=lambda s: quote(str(s)))


def page(request: Request, name: str, session: Session | None, status: int = 200, **context: Any) -> Response:
    response = templates.TemplateResponse(request, name, {"session": session, **context}, status_code=status)
    response.headers.update(HEADERS)
    return response


def install(app: FastAPI) -> None:
    """The static files and the error answers of the dashboard."""
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    @app.exception_handler(SignIn)
    async def _sign_in(request: Request, exc: SignIn | None) -> Response:
        if request.headers.get("hx-request") or request.method != "GET":
            response: Response = HTMLResponse("Sign in again.", status_code=401)
            response.headers["HX-Redirect"] = "/ui/login"
            return response
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        response = RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)
        response.headers.update(HEADERS)
        return response

    @app.exception_handler(Forged)
    async def _forged(request: Request, _: Forged) -> Response:
        return page(
            request, "error.html", None, status=403, title="Refused",
            message="This form did not come from a page of this dashboard, so nothing was changed. "
            "Reload the page and try again.",
        )  # fmt: skip

    @app.exception_handler(ApiFailed)
    async def _api_failed(request: Request, exc: ApiFailed) -> Response:
        if exc.status == 401:  # the key stopped working between sign-in and now
            return await _sign_in(request, None)
        return page(
            request, "error.html", None, status=exc.status, title=f"Error {exc.status}", message=exc.message
        )
