"""The gateway's app: ``create_app`` starts (and stops) the engines, installs the error answers
and the middleware, and holds every route: the completions (``serve/gateway.py`` serves them),
health, metrics, models and adapters, and the experiment, fine-tuning and pins APIs."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import shown
from adapterdeck.registry import Registry
from adapterdeck.registry.catalog import model_names
from adapterdeck.registry.errors import NotFound
from adapterdeck.registry.untrusted import file_name_problem
from adapterdeck.serve import errors, openai_schema
from adapterdeck.serve.auth import AdminCaller, Caller, UploadGuard
from adapterdeck.serve.errors import api_error, bad_request, model_not_found
from adapterdeck.serve.experiments import api as experiments_api
from adapterdeck.serve.finetune import api as finetune_api
from adapterdeck.serve.fleet import api as pins_api
from adapterdeck.serve.fleet.pins import PinWarmer
from adapterdeck.serve.fleet.replicas import supervisors
from adapterdeck.serve.gateway import Gateway
from adapterdeck.serve.limits import BodyLimit
from adapterdeck.serve.settings import ServeSettings

PAGE_LIMIT = 1000  # the default and the largest ?limit= of /v1/models and /v1/adapters


class AliasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=2**31 - 1, description="the version the alias should point at")


def create_app(settings: ServeSettings, registry: Registry, log_dir: Path | None = None) -> FastAPI:
    """The gateway app; it starts (and stops) its own vLLM servers (``vllm.replicas``) unless
    ``vllm.url``/``vllm.urls`` name running ones."""
    log = log_dir or Path(tempfile.gettempdir())
    gateway = Gateway(settings, registry, supervisors(settings, registry.settings.child_env(), log))
    pins = PinWarmer(gateway.vllm.fleet, registry, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.traffic.start()
        await gateway.vllm.open()
        await pins.start()
        try:
            yield
        finally:
            await pins.close()
            await gateway.traffic.close()
            if gateway.peft is not None:
                gateway.peft.close()
            await gateway.vllm.close()
            await gateway.limiter.close()

    app = FastAPI(title="adapterdeck", version="1", lifespan=lifespan)
    app.state.keys = gateway.keys  # the Caller dependency's
    app.state.settings, app.state.registry = settings, registry  # the fine-tuning API's
    app.add_middleware(BodyLimit, default=settings.max_body_bytes, uploads=settings.max_upload_bytes)
    app.add_middleware(UploadGuard, keys=gateway.keys)  # outermost: no body is read before the key
    errors.install(app)
    app.include_router(_status_routes(gateway))
    app.include_router(_inference_routes(gateway))
    app.include_router(_adapter_routes(registry, pins))
    app.include_router(experiments_api.router(gateway.traffic, gateway.metrics))
    app.include_router(finetune_api.router)
    app.include_router(pins_api.router(pins.pins, pins))
    if settings.ui:
        _dashboard(app)
    return app


def _dashboard(app: FastAPI) -> None:
    """The web dashboard at ``/ui`` (serve/ui/): pages over this gateway's own API."""
    from adapterdeck.serve.ui import adapters, experiments, jobs, render, serving

    render.install(app)
    for module in (adapters, jobs, experiments, serving):
        app.include_router(module.router)


async def health_report(gateway: Gateway) -> dict[str, Any]:
    """Every engine's state (each vLLM replica's), the database's and the running experiments'.
    The gateway is ok while one replica serves: a load balancer keeps sending it traffic."""
    vllm = await gateway.vllm.health()
    peft = gateway.peft.health() if gateway.peft is not None else {"status": "idle", "adapters": 0}
    database_ok = await gateway.database.check(gateway.registry)
    ok = gateway.vllm.ready() and database_ok
    return {
        "status": "ok" if ok else "degraded",
        "gateway": "ok",
        "database": "ok" if database_ok else "unreachable",
        "engines": {"vllm": vllm, "peft": peft},
        "experiments": {"running": len(gateway.traffic.running)},
    }


def _status_routes(gateway: Gateway) -> APIRouter:
    api = APIRouter()

    @api.get("/health")
    async def health(request: Request) -> JSONResponse:
        # Every detail for an admin key, only the status for anyone else.
        report = await health_report(gateway)
        shown_report = report if await gateway.keys.is_admin(request) else {"status": report["status"]}
        return JSONResponse(shown_report, status_code=200 if report["status"] == "ok" else 503)

    @api.get("/metrics")
    async def metrics(who: Caller) -> Response:
        # A tenant sees only its own series: other tenants' adapter names never show.
        view = gateway.metrics.registry if who.is_admin else gateway.metrics.view(who.tenant or "")
        return Response(generate_latest(view), media_type=CONTENT_TYPE_LATEST)

    return api


def _inference_routes(gateway: Gateway) -> APIRouter:
    api = APIRouter()
    registry, settings = gateway.registry, gateway.settings

    @api.get("/v1/models")
    async def models(who: Caller, limit: int = PAGE_LIMIT, after: str | None = None) -> dict[str, Any]:
        # One query per page (registry/catalog.py); the base leads the first page.
        limit, base = _page_limit(limit), settings.base_name()
        data = [] if after else [{"id": base, "object": "model", "created": 0, "owned_by": "adapterdeck"}]
        page = await asyncio.to_thread(
            model_names,
            registry,
            None if who.is_admin else who.tenant,
            after=None if after in (None, "", base) else after,
            limit=limit - len(data),
        )
        return _listing(data + [name.to_dict() for name in page.items], page.has_more)

    @api.post("/v1/chat/completions", openapi_extra=openai_schema.body(openai_schema.CHAT_COMPLETION))
    async def chat(request: Request, who: Caller) -> Response:
        return await gateway.completion("/v1/chat/completions", request, who)

    @api.post("/v1/completions", openapi_extra=openai_schema.body(openai_schema.COMPLETION))
    async def completions(request: Request, who: Caller) -> Response:
        return await gateway.completion("/v1/completions", request, who)

    return api


def _page_limit(limit: int) -> int:
    if not 1 <= limit <= PAGE_LIMIT:
        raise bad_request(f"'limit' must be between 1 and {PAGE_LIMIT}.", "limit")
    return limit


def _listing(data: list[dict[str, Any]], has_more: bool, key: str = "id") -> dict[str, Any]:
    """OpenAI's list shape; ``last_id`` is the ``after`` of the next page."""
    first, last = (data[0][key], data[-1][key]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}


async def _staged(ref: str, files: list[UploadFile], directory: Path) -> None:
    """Write the uploaded files into ``directory`` under the names as sent: a path or a second
    file of the same name is refused, never cut down to a plain name (it would silently replace a
    file)."""
    seen: set[str] = set()
    for upload in files:
        filename = upload.filename or ""
        problem = file_name_problem(filename)
        if problem is None and filename.startswith("."):
            problem = f"hidden file {shown(filename)}"
        if problem is None and filename in seen:
            problem = f"file {shown(filename)} is uploaded twice"
        if problem is not None:
            raise bad_request(f"cannot publish {ref}: {problem}", "files")
        seen.add(filename)
        (directory / filename).write_bytes(await upload.read())


def _adapter_routes(registry: Registry, pins: PinWarmer) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/adapters")
    async def adapters(who: Caller, limit: int = PAGE_LIMIT, after: str | None = None) -> dict[str, Any]:
        limit, tenant = _page_limit(limit), None if who.is_admin else who.tenant
        rows = await asyncio.to_thread(registry.list, tenant, after=after, limit=limit + 1)
        return _listing(rows[:limit], len(rows) > limit, key="adapter")

    @api.get("/v1/adapters/{tenant}/{name}")
    async def adapter(tenant: str, name: str, who: Caller) -> dict[str, Any]:
        if not who.may_use(tenant):
            raise model_not_found(f"{tenant}/{name}")
        info = await asyncio.to_thread(registry.show, f"{tenant}/{name}")
        history = await asyncio.to_thread(registry.alias_history, f"{tenant}/{name}")
        versions = await asyncio.to_thread(registry.versions, f"{tenant}/{name}")
        listed = [{k: v for k, v in each.to_dict().items() if k != "files"} for each in versions]
        return {**info.to_dict(), "alias_history": history, "versions": listed}

    @api.get("/v1/adapters/{tenant}/{name}/versions/{version}")
    async def version(tenant: str, name: str, version: int, who: Caller) -> dict[str, Any]:
        ref = f"{tenant}/{name}@{version}"
        if not who.may_use(tenant):
            raise model_not_found(ref)
        return (await asyncio.to_thread(registry.show, ref)).to_dict()

    @api.get("/v1/adapters/{tenant}/{name}/versions/{version}/report")
    async def report(tenant: str, name: str, version: int, who: Caller) -> dict[str, Any]:
        # The run report published with the version: 404 for another tenant's, as for the adapter.
        ref = f"{tenant}/{name}@{version}"
        if not who.may_use(tenant):
            raise model_not_found(ref)
        found = await asyncio.to_thread(registry.report, ref)
        if found is None:
            raise api_error(NotFound(f"{ref} was published without a run report"), code="report_not_found")
        return found

    @api.post("/v1/adapters/{tenant}/{name}/versions", status_code=201)
    async def publish(
        tenant: str, name: str, files: list[UploadFile], _: AdminCaller, alias: str | None = None
    ) -> dict[str, Any]:
        ref = f"{tenant}/{name}"
        with tempfile.TemporaryDirectory() as tmp:
            await _staged(ref, files, Path(tmp))
            try:
                info = await asyncio.to_thread(registry.publish, tmp, ref, alias=alias)
            except AdapterdeckError as exc:  # name the adapter, not the server's temporary directory
                raise api_error(exc, str(exc).replace(tmp, ref)) from None
        return info.to_dict()

    @api.put("/v1/adapters/{tenant}/{name}/aliases/{alias}")
    async def move_alias(tenant: str, name: str, alias: str, body: AliasBody, _: AdminCaller) -> Any:
        await pins.before_move(f"{tenant}/{name}", alias, body.version)  # a pinned alias moves warm
        info = await asyncio.to_thread(registry.set_alias, f"{tenant}/{name}", alias, body.version)
        pins.nudge()
        return info.to_dict()

    return api
