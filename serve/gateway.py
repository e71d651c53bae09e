"""The OpenAI-compatible gateway in front of vLLM (and the embedded PEFT engine).

Every request is authenticated, its ``model`` resolved to an immutable ``tenant/name@N`` (aliases
and bare names are resolved here, never by vLLM, which caches names forever), and sent to the
engine that can serve that adapter. The response's ``model`` names the ref that served it, and so
does the ``X-Adapterdeck-Ref`` header.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapterdeck.core.errors import AdapterdeckError, Fault
from adapterdeck.core.methods import ENGINE_PEFT, ENGINE_VLLM
from adapterdeck.registry import NotFound, Registry
from adapterdeck.registry.experiments import Experiment, Variant
from adapterdeck.registry.refs import InvalidRef, parse_ref
from adapterdeck.registry.tenants import Principal, authenticate
from adapterdeck.registry.validate import file_name_problem, shown
from adapterdeck.serve import openai_schema
from adapterdeck.serve.auth import AdminCaller, Caller, UploadGuard
from adapterdeck.serve.errors import (
    ApiError,
    bad_request,
    model_not_found,
    unauthorized,
    unavailable,
)
from adapterdeck.serve.experiments import Traffic, user_id
from adapterdeck.serve.experiments import router as experiment_router
from adapterdeck.serve.finetune import fine_tuned_models, fine_tuned_ref
from adapterdeck.serve.finetune import router as finetune_router
from adapterdeck.serve.limits import BodyLimit, Limiter
from adapterdeck.serve.limits import then as _then
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.settings import ServeSettings
from adapterdeck.serve.vllm_process import VllmSupervisor

logger = logging.getLogger("adapterdeck.serve")
REF_HEADER = "X-Adapterdeck-Ref"
EXPERIMENT_HEADER = "X-Adapterdeck-Experiment"
VARIANT_HEADER = "X-Adapterdeck-Variant"
SHADOW_OUTPUT_LIMIT = 4000
KEY_TTL = 10.0
VERSION_TTL = 10.0
VLLM_KEY_ENV = "ADAPTERDECK_VLLM_API_KEY"  # the key of a vLLM at --vllm-url, unless vllm.api_key sets it


@dataclass(frozen=True)
class Target:
    """Where a request goes: the immutable ref (None for the base), its engine, the model name to send,
    and the experiment variant it plays (when an experiment routed it)."""

    ref: str | None
    engine: str
    engine_model: str
    tenant: str
    experiment: Experiment | None = None
    variant: Variant | None = None

    @property
    def label(self) -> str:
        return self.ref or self.engine_model

    @property
    def labels(self) -> tuple[str, str, str, str, str]:
        experiment = self.experiment.adapter if self.experiment else ""
        return (self.tenant, self.label, self.engine, experiment, self.variant.name if self.variant else "")

    @property
    def headers(self) -> dict[str, str]:
        if self.experiment is None or self.variant is None:
            return {REF_HEADER: self.label}
        return {
            REF_HEADER: self.label,
            EXPERIMENT_HEADER: self.experiment.adapter,
            VARIANT_HEADER: self.variant.name,
        }


@dataclass
class Outcome:
    """What came back: filled in by the engine call (for a stream, when the stream ends)."""

    response_id: str | None = None
    usage: dict[str, Any] | None = None
    streaming: bool = False


class Gateway:
    def __init__(
        self, settings: ServeSettings, registry: Registry, supervisor: VllmSupervisor | None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.supervisor = supervisor
        self.vllm_url = settings.vllm.url.rstrip("/") if settings.vllm.url else supervisor.url  # type: ignore[union-attr]
        self.metrics = Metrics()
        self.traffic = Traffic(registry)
        # aiohttp for the hop to vLLM: its C parser costs a fraction of httpx's CPU per request.
        self.client: aiohttp.ClientSession | None = None
        self.peft: Any = None  # the embedded PEFT engine, created on first use
        self._vllm_loaded: set[str] = set()
        self._vllm_incarnation: int | None = None
        # Short-lived caches of the two lookups every request makes. Keys: a revoked key stops
        # working within KEY_TTL seconds. Versions: only immutable refs are cached (an alias or
        # a bare name is resolved on every request, so a move or a publish is live at once).
        self._keys: dict[str, tuple[float, Principal]] = {}
        self._versions: dict[str, tuple[float, Any]] = {}
        # The last answer for every key and name, used only while the database cannot be reached:
        # keys and adapters the gateway has already seen keep working through an outage.
        self._last_keys: dict[str, Principal] = {}
        self._last_versions: dict[str, Any] = {}
        self.database_ok = True
        self.limiter = Limiter(settings.limits, settings.tenant_limits)
        self._vllm_key = settings.vllm.api_key or os.environ.get(VLLM_KEY_ENV) or None
        # Each tenant's prefix-cache salt: a keyed hash of its name, so no client can name another
        # tenant's salt. Gateways sharing an engine (and its key) share the salts, hence the cache.
        self._salt_key = (self._vllm_key or "").encode() or secrets.token_bytes(32)

    def engine_headers(self) -> dict[str, str]:
        """The headers of every call to vLLM: the engine's API key (the current one for a vLLM
        this gateway started, a new one at every start)."""
        key = self.supervisor.api_key if self.supervisor is not None else self._vllm_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def cache_salt(self, tenant: str) -> str:
        """vLLM's ``cache_salt`` for ``tenant``: prefix-cache blocks are shared within a tenant only."""
        return hmac.new(self._salt_key, tenant.encode(), hashlib.sha256).hexdigest()[:32]

    # -- auth and routing ----------------------------------------------------------------------

    async def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized()
        who = await self._authenticate(key.strip())
        if who.tenant is not None:
            await self.limiter.check(who.tenant)
        return who

    async def _authenticate(self, key: str) -> Principal:
        now = time.monotonic()
        cached = self._keys.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._from_database(
            partial(authenticate, self.registry, key), key, self._last_keys, limit=10_000
        )
        if found is None:
            raise unauthorized("Invalid API key.")
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[key] = (now + KEY_TTL, found)
        return found

    def _database_down(self, exc: Exception) -> None:
        if self.database_ok:
            logger.warning("the registry database cannot be reached: %s", type(exc).__name__)
        self.database_ok = False

    async def _from_database(
        self, call: Callable[[], Any], name: str, last: dict[str, Any], limit: int
    ) -> Any:
        """``call()`` in a worker thread, remembered in ``last`` under ``name`` (at most ``limit``
        answers); while the database cannot be reached, the answer ``last`` remembers (503 when
        there is none)."""
        try:
            answer = await asyncio.to_thread(call)
        except SQLAlchemyError as exc:
            self._database_down(exc)
            if name in last:
                return last[name]
            raise unavailable("The registry database cannot be reached; retry shortly.") from None
        self.database_ok = True
        if answer is None:  # e.g. a revoked key: it must not come back during an outage
            last.pop(name, None)
        else:
            if len(last) > limit:
                last.clear()
            last[name] = answer
        return answer

    async def _lookup(self, ref: Any) -> Any:
        """The registry's answer for ``ref``; its last answer while the database is down."""
        resolve = partial(self.registry.resolve, ref)
        return await self._from_database(resolve, str(ref), self._last_versions, limit=100_000)

    async def _resolve(self, ref: Any) -> Any:
        if not ref.immutable:
            return await self._lookup(ref)
        now, name = time.monotonic(), str(ref)
        cached = self._versions.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        info = await self._lookup(ref)
        if len(self._versions) > 10_000:
            self._versions.clear()
        self._versions[name] = (now + VERSION_TTL, info)
        return info

    async def route(self, model: Any, principal: Principal, user: str | None = None) -> Target:
        if not isinstance(model, str) or not model:
            raise bad_request(
                "'model' is required: the base, tenant/name, tenant/name@N or tenant/name:alias", "model"
            )
        if model.startswith("ft:"):  # a fine-tuning job's result: its immutable ref
            lookup = partial(fine_tuned_ref, self.registry, model, principal)
            scoped = f"{principal.tenant or ''}|{model}"  # each caller's answer: a 404 for others
            model = await self._from_database(lookup, scoped, self._last_versions, limit=100_000)
        base_name = self.settings.base_name()
        if model in (base_name, self.settings.base):
            return Target(None, ENGINE_VLLM, base_name, principal.tenant or "admin")
        try:
            ref = parse_ref(model)
        except InvalidRef:
            raise model_not_found(model) from None
        if not principal.may_use(ref.tenant):
            raise model_not_found(model)
        if ref.version is None and ref.alias is None:
            experiment = self.traffic.lookup(ref.adapter)
            if experiment is not None:
                return await self.variant_target(experiment, experiment.assign(user))
        try:
            info = await self._resolve(ref)
        except NotFound:
            raise model_not_found(model) from None
        engine = ENGINE_VLLM if ENGINE_VLLM in info.served_by else ENGINE_PEFT
        return Target(info.ref, engine, info.ref, ref.tenant)

    async def variant_target(self, experiment: Experiment, variant: Variant) -> Target:
        if variant.ref is None:
            base = self.settings.base_name()
            return Target(None, ENGINE_VLLM, base, experiment.tenant, experiment, variant)
        try:
            info = await self._resolve(parse_ref(variant.ref))
        except NotFound:  # deleted under a running experiment (delete refuses that)
            raise model_not_found(experiment.adapter) from None
        engine = ENGINE_VLLM if ENGINE_VLLM in info.served_by else ENGINE_PEFT
        return Target(info.ref, engine, info.ref, experiment.tenant, experiment, variant)

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

    async def forward_vllm(
        self, path: str, body: dict[str, Any], target: Target, outcome: Outcome | None = None
    ) -> Response:
        if not self.vllm_ready():
            raise unavailable("The vLLM engine is starting or restarting; retry shortly.")
        assert self.client is not None
        # The tenant's own cache salt, whatever the client sent: no prompt prefix is shared with
        # another tenant's, so the latency of a cache hit tells nothing about other tenants' prompts.
        body = {**body, "model": target.engine_model, "cache_salt": self.cache_salt(target.tenant)}
        first_load = self._note_vllm_load(target)
        headers = self.engine_headers()
        started = time.monotonic()
        if body.get("stream"):
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            try:
                upstream = await self.client.post(f"{self.vllm_url}{path}", json=body, headers=headers)
            except aiohttp.ClientConnectionError:
                raise unavailable("The vLLM engine is not reachable; retry shortly.") from None
            if upstream.status != 200:
                content = await upstream.read()
                upstream.release()
                self._check_engine_key(upstream.status)
                return Response(content, status_code=upstream.status, media_type="application/json")
            if outcome is not None:
                outcome.streaming = True
            return StreamingResponse(
                self._relay(upstream, target, wants_usage, started, first_load, outcome),
                media_type="text/event-stream",
                headers=target.headers,
            )
        try:
            async with self.client.post(f"{self.vllm_url}{path}", json=body, headers=headers) as upstream:
                content, status = await upstream.read(), upstream.status
        except aiohttp.ClientError:  # refused, or vLLM went away mid-answer
            raise unavailable("The vLLM engine is not reachable; retry shortly.") from None
        self._check_engine_key(status)
        if status == 200:
            try:
                payload = json.loads(content)
                self._count_usage(target, payload.get("usage"))
                if outcome is not None:
                    outcome.response_id, outcome.usage = payload.get("id"), payload.get("usage")
            except (ValueError, AttributeError):
                pass
            if first_load:
                self._record_load(target, time.monotonic() - started)
            # vLLM's body goes out as it came: it already names the immutable ref.
            return Response(content, media_type="application/json", headers=target.headers)
        if first_load:
            self._vllm_loaded.discard(target.ref or "")
        return Response(content, status_code=status, media_type="application/json")

    def _check_engine_key(self, status: int) -> None:
        """vLLM answers 401 only when it refuses the gateway's key: the server is misconfigured."""
        if status != 401:
            return
        where = "vllm.api_key (or ADAPTERDECK_VLLM_API_KEY)" if self.supervisor is None else "its key"
        logger.error("the vLLM engine at %s refused the gateway's API key: set %s", self.vllm_url, where)
        raise ApiError(
            502, "The inference engine refused this gateway; the server log says why.", "server_error",
            code="engine_unauthorized",
        )  # fmt: skip

    async def _relay(
        self,
        upstream: aiohttp.ClientResponse,
        target: Target,
        wants_usage: bool,
        started: float,
        first_load: bool,
        outcome: Outcome | None,
    ) -> AsyncIterator[bytes]:
        status = 200
        try:
            async for raw in upstream.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        chunk = None
                    if outcome is not None and isinstance(chunk, dict) and outcome.response_id is None:
                        outcome.response_id = chunk.get("id")
                    if isinstance(chunk, dict) and chunk.get("usage"):
                        self._count_usage(target, chunk["usage"])
                        if outcome is not None:
                            outcome.usage = chunk["usage"]
                        if not wants_usage and not chunk.get("choices"):
                            continue
                        if not wants_usage:
                            chunk.pop("usage")
                            line = "data: " + json.dumps(chunk)
                yield (line + "\n").encode()
        except BaseException:
            status = 599  # the stream broke off (or the client went away)
            raise
        finally:
            upstream.release()
            if first_load:
                self._record_load(target, time.monotonic() - started)
            if outcome is not None and target.experiment is not None:
                self._note_experiment(target, outcome, status, time.monotonic() - started)

    def _count_usage(self, target: Target, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        labels = target.labels
        self.metrics.prompt_tokens.labels(*labels).inc(usage.get("prompt_tokens") or 0)
        self.metrics.completion_tokens.labels(*labels).inc(usage.get("completion_tokens") or 0)

    def _record_load(self, target: Target, seconds: float) -> None:
        self.metrics.adapter_loads.labels(target.label, target.engine).inc()
        self.metrics.adapter_load_latency.labels(target.engine).observe(seconds)

    async def forward_peft(
        self, path: str, body: dict[str, Any], target: Target, outcome: Outcome | None = None
    ) -> Response:
        from adapterdeck.serve.peft_engine import PeftEngine

        if self.peft is None:
            self.peft = PeftEngine(self.settings, self.registry, self.metrics)
        payload = await self.peft.complete(path, body, target.ref or "")
        self._count_usage(target, payload.get("usage"))
        if outcome is not None:
            outcome.response_id, outcome.usage = payload.get("id"), payload.get("usage")
        if body.get("stream"):
            return StreamingResponse(
                self.peft.as_stream(payload), media_type="text/event-stream", headers=target.headers
            )
        return JSONResponse(payload, headers=target.headers)

    async def completion(self, path: str, request: Request, principal: Principal) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("The request body is not valid JSON.") from None
        except RecursionError:  # json's C parser gives up on deep nesting this way
            raise bad_request("The request body is nested too deeply.") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        field = "messages" if path.endswith("chat/completions") else "prompt"
        if field not in body:
            raise bad_request(f"'{field}' is required.", field)
        self._check_bounds(body)
        if field == "prompt":
            self._check_choices(body)
        if principal.tenant is None:  # admin keys have no per-tenant limits
            return await self._complete(path, request, body, principal)
        with self.limiter.slot(principal.tenant) as release_later:
            response = await self._complete(path, request, body, principal)
            if isinstance(response, StreamingResponse):  # the slot is held until the stream ends
                response.body_iterator = _then(response.body_iterator, release_later())
            return response

    def _check_bounds(self, body: dict[str, Any]) -> None:
        """Refuse what would tie an engine up: a huge max_tokens or n, a non-boolean stream."""
        limit = self.settings.max_tokens or self.settings.vllm.max_model_len
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad_request(f"'{name}' must be a positive integer.", name)
            if limit is not None and value > limit:
                raise bad_request(f"'{name}' is {value}; this server allows at most {limit}.", name)
        if self.settings.max_tokens and not (body.get("max_tokens") or body.get("max_completion_tokens")):
            body["max_tokens"] = self.settings.max_tokens  # the server's limit bounds an open request too
        n, max_n = body.get("n"), self.settings.max_n
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n):
            raise bad_request(f"'n' must be an integer from 1 to {max_n}.", "n")
        if not isinstance(body.get("stream", False), bool):
            raise bad_request("'stream' must be true or false.", "stream")

    def _check_choices(self, body: dict[str, Any]) -> None:
        """A completion asks for prompts x n choices: at most ``max_choices``."""
        prompt, n = body.get("prompt"), body.get("n") or 1
        if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
            prompts = len(prompt)  # a list of prompts (texts or token lists); else one prompt
        else:
            prompts = 1
        limit = self.settings.max_choices
        if prompts * n > limit:
            raise bad_request(
                f"{prompts} prompts x n={n} asks for {prompts * n} choices; this server allows at most "
                f"{limit} a request (max_choices).",
                "prompt",
            )

    async def _complete(
        self, path: str, request: Request, body: dict[str, Any], principal: Principal
    ) -> Response:
        target = await self.route(body.get("model"), principal, user_id(body, request))
        labels = target.labels
        outcome = Outcome()
        started = time.monotonic()
        status = "error"
        if target.experiment is not None and target.experiment.shadow is not None:
            self._start_shadow(path, body, target.experiment)
        try:
            if target.engine == ENGINE_VLLM:
                response = await self.forward_vllm(path, body, target, outcome)
            else:
                response = await self.forward_peft(path, body, target, outcome)
            status = str(response.status_code)
            if response.status_code >= 400:
                self.metrics.errors.labels(*labels, f"http_{response.status_code}").inc()
            return response
        except ApiError as exc:
            status = str(exc.status)
            self.metrics.errors.labels(*labels, exc.type).inc()
            raise
        finally:
            elapsed = time.monotonic() - started
            self.metrics.requests.labels(*labels, path, status).inc()
            self.metrics.latency.labels(*labels).observe(elapsed)
            if target.experiment is not None and not outcome.streaming:
                self._note_experiment(target, outcome, int(status) if status.isdigit() else 500, elapsed)

    # -- experiments ---------------------------------------------------------------------------

    def _note_experiment(
        self,
        target: Target,
        outcome: Outcome,
        status: int,
        seconds: float,
        shadow: bool = False,
        output: str | None = None,
    ) -> None:
        assert target.experiment is not None and target.variant is not None
        usage = outcome.usage or {}
        self.traffic.note(
            {
                "response_id": outcome.response_id or f"failed-{uuid.uuid4().hex}",
                "experiment_id": target.experiment.id,
                "variant": target.variant.name,
                "shadow": int(shadow),
                "status": status,
                "latency_ms": round(seconds * 1000),
                "prompt_tokens": usage.get("prompt_tokens") or 0,
                "completion_tokens": usage.get("completion_tokens") or 0,
                "output": output,
            }
        )

    def _start_shadow(self, path: str, body: dict[str, Any], experiment: Experiment) -> None:
        """Send a copy of the request to the shadow variant; its answer is recorded, never returned."""
        assert experiment.shadow is not None
        if self.traffic.shadow_slots.locked():  # saturated: drop the copy, never slow the real request
            self.metrics.shadow_requests.labels(experiment.adapter, experiment.shadow.name, "dropped").inc()
            return
        task = asyncio.create_task(self._shadow(path, body, experiment, experiment.shadow))
        self.traffic.shadow_tasks.add(task)  # waited for when the gateway stops
        task.add_done_callback(self.traffic.shadow_tasks.discard)

    async def _shadow(
        self, path: str, body: dict[str, Any], experiment: Experiment, variant: Variant
    ) -> None:
        copy = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        outcome, status, output = Outcome(), 500, None
        started = time.monotonic()
        async with self.traffic.shadow_slots:
            try:
                target = await self.variant_target(experiment, variant)
                if target.engine == ENGINE_VLLM:
                    response = await self.forward_vllm(path, copy, target, outcome)
                else:
                    response = await self.forward_peft(path, copy, target, outcome)
                status = response.status_code
                if status == 200:
                    choice = (json.loads(bytes(response.body)).get("choices") or [{}])[0]
                    output = (choice.get("message") or {}).get("content") or choice.get("text")
            except ApiError as exc:
                status = exc.status
            except Exception:
                logger.exception("shadow request to %s failed", variant.ref)
                return
            finally:
                self.metrics.shadow_requests.labels(experiment.adapter, variant.name, str(status)).inc()
        target = Target(variant.ref, ENGINE_VLLM, variant.ref or "", experiment.tenant, experiment, variant)
        text = output[:SHADOW_OUTPUT_LIMIT] if isinstance(output, str) else None
        self._note_experiment(target, outcome, status, time.monotonic() - started, shadow=True, output=text)

    async def health(self, request: Request) -> dict[str, Any]:
        """The report: every detail for an admin key, only the status for anyone else."""
        report = await self._health()
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        admin = False
        if scheme.lower() == "bearer" and key.strip():
            try:
                admin = (await self._authenticate(key.strip())).is_admin
            except ApiError:
                admin = False
        return report if admin else {"status": report["status"]}

    async def _health(self) -> dict[str, Any]:
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
                timeout = aiohttp.ClientTimeout(total=2)
                async with self.client.get(f"{self.vllm_url}/health", timeout=timeout) as reply:
                    ok = reply.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            vllm["status"] = "ready" if ok else "unreachable"
        peft = self.peft.health() if self.peft is not None else {"status": "idle", "adapters": 0}
        try:
            await asyncio.wait_for(asyncio.to_thread(self.registry.ping), timeout=5)
            self.database_ok = True
        except (SQLAlchemyError, TimeoutError) as exc:
            self._database_down(exc)
        ok = vllm["status"] == "ready" and self.database_ok
        return {
            "status": "ok" if ok else "degraded",
            "gateway": "ok",
            "database": "ok" if self.database_ok else "unreachable",
            "engines": {"vllm": vllm, "peft": peft},
            "experiments": {"running": len(self.traffic.running)},
        }


class AliasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=2**31 - 1, description="the version the alias should point at")


def _status_of(exc: AdapterdeckError) -> int:
    return exc.http_status


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
        gateway.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=600, sock_connect=2),
            connector=aiohttp.TCPConnector(limit=512),
            read_bufsize=2**20,  # SSE lines (a chunk with logprobs) up to 2 MiB
        )
        await gateway.traffic.start()
        if supervisor is not None:
            await supervisor.start()
        try:
            yield
        finally:
            await gateway.traffic.close()
            if supervisor is not None:
                await supervisor.stop()
            if gateway.peft is not None:
                gateway.peft.close()
            await gateway.client.close()

    app = FastAPI(title="adapterdeck", version="1", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(BodyLimit, default=settings.max_body_bytes, uploads=settings.max_upload_bytes)
    app.add_middleware(UploadGuard, gateway=gateway)  # outermost: no body is read before the key

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # An unknown route or method: the same error shape as everything else.
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(AdapterdeckError)
    async def _user_error(_: Request, exc: AdapterdeckError) -> JSONResponse:
        if isinstance(exc, Fault):  # the server's problem: its details go to the log only
            incident = uuid.uuid4().hex[:12]
            logger.error("server fault (incident %s): %s", incident, exc)
            message = f"internal error (incident {incident}); the server log has the details"
            return ApiError(exc.http_status, message, "server_error").response()
        return ApiError(_status_of(exc), str(exc), "invalid_request_error").response()

    @app.exception_handler(OSError)
    async def _storage_error(_: Request, exc: OSError) -> JSONResponse:
        # A full disk (507) or storage that cannot be written now (503): the client may retry.
        logger.error("storage error: %s", exc)
        status = 507 if exc.errno == errno.ENOSPC else 503
        message = f"the registry's storage cannot be written: {exc.strerror or type(exc).__name__}"
        return ApiError(status, message, "server_error", code="storage_error").response()

    @app.exception_handler(ClientDisconnect)
    async def _disconnected(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up before its body was in: nobody to answer, nothing went wrong here.
        where = f"{request.method} {request.url.path}"
        logger.info("client disconnected before its request body was in: %s", where)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The details go to the log under an id, never to the client (they may hold secrets).
        incident = uuid.uuid4().hex[:12]
        logger.exception("unexpected error (incident %s)", incident)
        message = f"internal error (incident {incident}); the server log has the details"
        return ApiError(500, message, "server_error").response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return bad_request(f"{where}: {first.get('msg', 'invalid request')}", where or None).response()

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        report = await gateway.health(request)
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics(who: Caller) -> Response:
        # A tenant sees only its own series: other tenants' adapter names never show.
        view = gateway.metrics.registry if who.is_admin else gateway.metrics.view(who.tenant or "")
        return Response(generate_latest(view), media_type=CONTENT_TYPE_LATEST)

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

    @app.post("/v1/chat/completions", openapi_extra=openai_schema.body(openai_schema.CHAT_COMPLETION))
    async def chat(request: Request, who: Caller) -> Response:
        return await gateway.completion("/v1/chat/completions", request, who)

    @app.post("/v1/completions", openapi_extra=openai_schema.body(openai_schema.COMPLETION))
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
        ref = f"{tenant}/{name}"
        with tempfile.TemporaryDirectory() as tmp:
            seen: set[str] = set()
            for upload in files:
                # The name as sent: a path or a second file of the same name is refused, never
                # cut down to a plain name (it would silently replace a file).
                filename = upload.filename or ""
                problem = file_name_problem(filename)
                if problem is None and filename.startswith("."):
                    problem = f"hidden file {shown(filename)}"
                if problem is None and filename in seen:
                    problem = f"file {shown(filename)} is uploaded twice"
                if problem is not None:
                    raise bad_request(f"cannot publish {ref}: {problem}", "files")
                seen.add(filename)
                (Path(tmp) / filename).write_bytes(await upload.read())
            try:
                info = await asyncio.to_thread(registry.publish, tmp, ref, alias=alias)
            except AdapterdeckError as exc:  # name the adapter, not the server's temporary directory
                message = str(exc).replace(tmp, ref)
                raise ApiError(_status_of(exc), message, "invalid_request_error") from None
        return info.to_dict()

    @app.put("/v1/adapters/{tenant}/{name}/aliases/{alias}")
    async def move_alias(tenant: str, name: str, alias: str, body: AliasBody, _: AdminCaller) -> Any:
        info = await asyncio.to_thread(registry.set_alias, f"{tenant}/{name}", alias, body.version)
        return info.to_dict()

    app.include_router(experiment_router())
    app.include_router(finetune_router)
    return app
