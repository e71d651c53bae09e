"""The OpenAI-compatible gateway in front of vLLM (and the embedded PEFT engine).

Every request is authenticated, its ``model`` resolved to an immutable ``tenant/name@N`` (aliases
and bare names are resolved here, never by vLLM, which caches names forever), and sent to the
engine that can serve that adapter. The response's ``model`` names the ref that served it, and so
does the ``X-Adapterdeck-Ref`` header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.methods import ENGINE_PEFT, ENGINE_VLLM
from adapterdeck.registry import NotFound, Registry
from adapterdeck.registry.refs import InvalidRef, parse_ref
from adapterdeck.registry.tenants import Principal, authenticate
from adapterdeck.serve.errors import (
    ApiError,
    bad_request,
    forbidden,
    model_not_found,
    unauthorized,
    unavailable,
)
from adapterdeck.serve.finetune import fine_tuned_models, fine_tuned_ref
from adapterdeck.serve.finetune import router as finetune_router
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.settings import ServeSettings
from adapterdeck.serve.vllm_process import VllmSupervisor

logger = logging.getLogger("adapterdeck.serve")
REF_HEADER = "X-Adapterdeck-Ref"
KEY_TTL = 10.0
VERSION_TTL = 10.0


@dataclass(frozen=True)
class Target:
    """Where a request goes: the immutable ref (None for the base), its engine, the model name to send."""

    ref: str | None
    engine: str
    engine_model: str
    tenant: str

    @property
    def label(self) -> str:
        return self.ref or self.engine_model


class Gateway:
    def __init__(
        self, settings: ServeSettings, registry: Registry, supervisor: VllmSupervisor | None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.supervisor = supervisor
        self.vllm_url = settings.vllm.url.rstrip("/") if settings.vllm.url else supervisor.url  # type: ignore[union-attr]
        self.metrics = Metrics()
        self.client: httpx.AsyncClient | None = None
        self.peft: Any = None  # the embedded PEFT engine, created on first use
        self._vllm_loaded: set[str] = set()
        self._vllm_incarnation: int | None = None
        # Short-lived caches of the two lookups every request makes. Keys: a revoked key stops
        # working within KEY_TTL seconds. Versions: only immutable refs are cached (an alias or
        # a bare name is resolved on every request, so a move or a publish is live at once).
        self._keys: dict[str, tuple[float, Principal]] = {}
        self._versions: dict[str, tuple[float, Any]] = {}

    # -- auth and routing ----------------------------------------------------------------------

    async def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized()
        key = key.strip()
        now = time.monotonic()
        cached = self._keys.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await asyncio.to_thread(authenticate, self.registry, key)
        if found is None:
            raise unauthorized("Invalid API key.")
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[key] = (now + KEY_TTL, found)
        return found

    async def _resolve(self, ref: Any) -> Any:
        if not ref.immutable:
            return await asyncio.to_thread(self.registry.resolve, ref)
        now, name = time.monotonic(), str(ref)
        cached = self._versions.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        info = await asyncio.to_thread(self.registry.resolve, ref)
        if len(self._versions) > 10_000:
            self._versions.clear()
        self._versions[name] = (now + VERSION_TTL, info)
        return info

    async def route(self, model: Any, principal: Principal) -> Target:
        if not isinstance(model, str) or not model:
            raise bad_request(
                "'model' is required: the base, tenant/name, tenant/name@N or tenant/name:alias", "model"
            )
        if model.startswith("ft:"):  # a fine-tuning job's result: its immutable ref
            model = await asyncio.to_thread(fine_tuned_ref, self.registry, model, principal)
        base_name = self.settings.base_name()
        if model in (base_name, self.settings.base):
            return Target(None, ENGINE_VLLM, base_name, principal.tenant or "admin")
        try:
            ref = parse_ref(model)
        except InvalidRef:
            raise model_not_found(model) from None
        if not principal.may_use(ref.tenant):
            raise model_not_found(model)
        try:
            info = await self._resolve(ref)
        except NotFound:
            raise model_not_found(model) from None
        engine = ENGINE_VLLM if ENGINE_VLLM in info.served_by else ENGINE_PEFT
        return Target(info.ref, engine, info.ref, ref.tenant)

    # -- engines -------------------------------------------------------------------------------

    def vllm_ready(self) -> bool:
        return self.supervisor is None or self.supervisor.ready.is_set()

    def _note_vllm_load(self, target: Target) -> bool:
        """True when this is the first request to the adapter since vLLM (re)started."""
        incarnation = self.supervisor.restarts if self.supervisor else 0
        if incarnation != self._vllm_incarnation:
            self._vllm_incarnation, self._vllm_loaded = incarnation, set()
        if target.ref is None or target.ref in self._vllm_loaded:
            return False
        self._vllm_loaded.add(target.ref)
        return True

    async def forward_vllm(self, path: str, body: dict[str, Any], target: Target) -> Response:
        if not self.vllm_ready():
            raise unavailable("The vLLM engine is starting or restarting; retry shortly.")
        assert self.client is not None
        body = {**body, "model": target.engine_model}
        first_load = self._note_vllm_load(target)
        started = time.monotonic()
        if body.get("stream"):
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            request = self.client.build_request("POST", f"{self.vllm_url}{path}", json=body)
            try:
                upstream = await self.client.send(request, stream=True)
            except httpx.TransportError:
                raise unavailable("The vLLM engine is not reachable; retry shortly.") from None
            if upstream.status_code != 200:
                content = await upstream.aread()
                await upstream.aclose()
                return Response(content, status_code=upstream.status_code, media_type="application/json")
            return StreamingResponse(
                self._relay(upstream, target, wants_usage, started, first_load),
                media_type="text/event-stream",
                headers={REF_HEADER: target.label},
            )
        try:
            upstream = await self.client.post(f"{self.vllm_url}{path}", json=body)
        except httpx.TransportError:
            raise unavailable("The vLLM engine is not reachable; retry shortly.") from None
        if upstream.status_code == 200:
            content = upstream.content
            try:
                self._count_usage(target, json.loads(content).get("usage"))
            except (ValueError, AttributeError):
                pass
            if first_load:
                self._record_load(target, time.monotonic() - started)
            # vLLM's body goes out as it came: it already names the immutable ref.
            return Response(content, media_type="application/json", headers={REF_HEADER: target.label})
        if first_load:
            self._vllm_loaded.discard(target.ref or "")
        return Response(upstream.content, status_code=upstream.status_code, media_type="application/json")

    async def _relay(
        self, upstream: httpx.Response, target: Target, wants_usage: bool, started: float, first_load: bool
    ) -> AsyncIterator[bytes]:
        try:
            async for line in upstream.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        chunk = None
                    if isinstance(chunk, dict) and chunk.get("usage"):
                        self._count_usage(target, chunk["usage"])
                        if not wants_usage and not chunk.get("choices"):
                            continue
                        if not wants_usage:
                            chunk.pop("usage")
                            line = "data: " + json.dumps(chunk)
                yield (line + "\n").encode()
        finally:
            await upstream.aclose()
            if first_load:
                self._record_load(target, time.monotonic() - started)

    def _count_usage(self, target: Target, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        labels = (target.tenant, target.label, target.engine)
        self.metrics.prompt_tokens.labels(*labels).inc(usage.get("prompt_tokens") or 0)
        self.metrics.completion_tokens.labels(*labels).inc(usage.get("completion_tokens") or 0)

    def _record_load(self, target: Target, seconds: float) -> None:
        self.metrics.adapter_loads.labels(target.label, target.engine).inc()
        self.metrics.adapter_load_latency.labels(target.engine).observe(seconds)

    async def forward_peft(self, path: str, body: dict[str, Any], target: Target) -> Response:
        from adapterdeck.serve.peft_engine import PeftEngine

        if self.peft is None:
            self.peft = PeftEngine(self.settings, self.registry, self.metrics)
        payload = await self.peft.complete(path, body, target.ref or "")
        self._count_usage(target, payload.get("usage"))
        if body.get("stream"):
            return StreamingResponse(
                self.peft.as_stream(payload),
                media_type="text/event-stream",
                headers={REF_HEADER: target.label},
            )
        return JSONResponse(payload, headers={REF_HEADER: target.label})

    async def completion(self, path: str, request: Request, principal: Principal) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        field = "messages" if path.endswith("chat/completions") else "prompt"
        if field not in body:
            raise bad_request(f"'{field}' is required.", field)
        target = await self.route(body.get("model"), principal)
        labels = (target.tenant, target.label, target.engine)
        started = time.monotonic()
        status = "error"
        try:
            if target.engine == ENGINE_VLLM:
                response = await self.forward_vllm(path, body, target)
            else:
                response = await self.forward_peft(path, body, target)
            status = str(response.status_code)
            if response.status_code >= 400:
                self.metrics.errors.labels(*labels, f"http_{response.status_code}").inc()
            return response
        except ApiError as exc:
            status = str(exc.status)
            self.metrics.errors.labels(*labels, exc.type).inc()
            raise
        finally:
            self.metrics.requests.labels(*labels, path, status).inc()
            self.metrics.latency.labels(*labels).observe(time.monotonic() - started)

    async def health(self) -> dict[str, Any]:
        vllm: dict[str, Any] = {"url": self.vllm_url}
        if self.supervisor is not None:
            vllm.update(
                status="ready" if self.supervisor.ready.is_set() else "starting",
                pid=self.supervisor.pid(),
                restarts=self.supervisor.restarts,
            )
        else:
            try:
                assert self.client is not None
                ok = (await self.client.get(f"{self.vllm_url}/health", timeout=2)).status_code == 200
            except httpx.HTTPError:
                ok = False
            vllm["status"] = "ready" if ok else "unreachable"
        peft = self.peft.health() if self.peft is not None else {"status": "idle", "adapters": 0}
        ok = vllm["status"] == "ready"
        return {
            "status": "ok" if ok else "degraded",
            "gateway": "ok",
            "engines": {"vllm": vllm, "peft": peft},
        }


async def _principal(request: Request) -> Principal:
    return await request.app.state.gateway.principal(request)


Caller = Annotated[Principal, Depends(_principal)]


def _admin(who: Caller) -> Principal:
    if not who.is_admin:
        raise forbidden("This needs an admin key.")
    return who


AdminCaller = Annotated[Principal, Depends(_admin)]


def create_app(settings: ServeSettings, registry: Registry, log_dir: Path | None = None) -> FastAPI:
    """The gateway app; it starts (and stops) its own vLLM unless ``settings.vllm.url`` names one."""
    supervisor = None
    if not settings.vllm.url:
        env = {}
        for key, value in (
            ("ADAPTERDECK_HOME", registry.settings.home),
            ("ADAPTERDECK_DATABASE_URL", registry.settings.resolved_database_url()),
            ("ADAPTERDECK_STORAGE_URL", registry.settings.resolved_storage_url()),
        ):
            env[key] = str(value)
        log = (log_dir or Path(tempfile.gettempdir())) / f"adapterdeck-vllm-{settings.vllm.port}.log"
        supervisor = VllmSupervisor(settings, env, log)
    gateway = Gateway(settings, registry, supervisor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway.client = httpx.AsyncClient(
            timeout=httpx.Timeout(600, connect=2), limits=httpx.Limits(max_connections=512)
        )
        if supervisor is not None:
            await supervisor.start()
        try:
            yield
        finally:
            if supervisor is not None:
                await supervisor.stop()
            if gateway.peft is not None:
                gateway.peft.close()
            await gateway.client.aclose()

    app = FastAPI(title="adapterdeck", version="1", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(AdapterdeckError)
    async def _user_error(_: Request, exc: AdapterdeckError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 400
        return ApiError(status, str(exc), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return bad_request(f"{where}: {first.get('msg', 'invalid request')}", where or None).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        report = await gateway.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(who: Caller) -> dict[str, Any]:
        rows = await asyncio.to_thread(registry.list, None if who.is_admin else who.tenant)
        data = [{"id": settings.base_name(), "object": "model", "created": 0, "owned_by": "adapterdeck"}]
        for row in rows:
            names = [row["adapter"], *(f"{row['adapter']}@{v}" for v in row["versions"])]
            names += [f"{row['adapter']}:{a}" for a in sorted(row["aliases"])]
            data += [{"id": n, "object": "model", "created": 0, "owned_by": row["tenant"]} for n in names]
        data += await asyncio.to_thread(fine_tuned_models, registry, who)
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, who: Caller) -> Response:
        return await gateway.completion("/v1/chat/completions", request, who)

    @app.post("/v1/completions")
    async def completions(request: Request, who: Caller) -> Response:
        return await gateway.completion("/v1/completions", request, who)

    @app.get("/v1/adapters")
    async def adapters(who: Caller) -> dict[str, Any]:
        rows = await asyncio.to_thread(registry.list, None if who.is_admin else who.tenant)
        return {"object": "list", "data": rows}

    @app.get("/v1/adapters/{tenant}/{name}")
    async def adapter(tenant: str, name: str, who: Caller) -> dict[str, Any]:
        if not who.may_use(tenant):
            raise model_not_found(f"{tenant}/{name}")
        info = await asyncio.to_thread(registry.show, f"{tenant}/{name}")
        return {**info.to_dict(), "alias_history": registry.alias_history(f"{tenant}/{name}")}

    @app.post("/v1/adapters/{tenant}/{name}/versions", status_code=201)
    async def publish(
        tenant: str,
        name: str,
        files: list[UploadFile],
        _: AdminCaller,
        alias: str | None = None,
    ) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            for upload in files:
                filename = Path(upload.filename or "").name
                if not filename or filename.startswith("."):
                    raise bad_request(f"bad file name {upload.filename!r}", "files")
                (Path(tmp) / filename).write_bytes(await upload.read())
            info = await asyncio.to_thread(registry.publish, tmp, f"{tenant}/{name}", alias=alias)
        return info.to_dict()

    @app.put("/v1/adapters/{tenant}/{name}/aliases/{alias}")
    async def move_alias(tenant: str, name: str, alias: str, request: Request, _: AdminCaller) -> Any:
        try:
            body = await request.json()
            version = int(body["version"])
        except (ValueError, KeyError, TypeError):
            raise bad_request('expected {"version": N}', "version") from None
        info = await asyncio.to_thread(registry.set_alias, f"{tenant}/{name}", alias, version)
        return info.to_dict()

    app.include_router(finetune_router)
    return app
