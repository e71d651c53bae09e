"""The request path of a completion: the OpenAI-compatible gateway in front of vLLM (and the
embedded PEFT engine).

Every completion's ``model`` is resolved to an engine target (aliases and bare names are resolved
here, never by vLLM, which caches names forever): the base, an immutable ``tenant/name@N``, or
the variant an A/B experiment assigns. The request goes to the engine that can serve that target,
and the metrics and the experiment's record count what came back. The response's ``model`` names
the ref that served it, and so does the ``X-Adapterdeck-Ref`` header. The app around it (routes,
errors, start-up) is ``serve/app.py``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from adapterdeck.core.methods import ENGINE_PEFT, ENGINE_VLLM
from adapterdeck.registry import NotFound, Registry
from adapterdeck.registry.cache import Lru
from adapterdeck.registry.experiments import Experiment, Variant
from adapterdeck.registry.finetune import resolve_fine_tuned
from adapterdeck.registry.refs import InvalidRef, Ref, parse_ref
from adapterdeck.registry.tenants import Principal
from adapterdeck.serve.auth import Keys
from adapterdeck.serve.engines.process import VllmSupervisor
from adapterdeck.serve.engines.vllm import VllmEngine
from adapterdeck.serve.errors import ApiError, bad_request, model_not_found
from adapterdeck.serve.experiments.shadow import Shadows
from adapterdeck.serve.experiments.traffic import Traffic, user_id
from adapterdeck.serve.limits import Limiter, check_request, then
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.outage import DatabaseStatus, Remembered
from adapterdeck.serve.settings import ServeSettings
from adapterdeck.serve.target import Outcome, Target

VERSION_TTL = 10.0
CACHED_VERSIONS = 10_000
REMEMBERED_VERSIONS = 100_000


class Gateway:
    """A completion's path: route its model to a target, call the target's engine, count the answer."""

    def __init__(
        self, settings: ServeSettings, registry: Registry, supervisors: list[VllmSupervisor]
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics()
        self.database = DatabaseStatus()
        self.limiter = Limiter(settings.limits, settings.tenant_limits, settings.limits_storage)
        self.keys = Keys(registry, self.database, self.limiter)
        self.traffic = Traffic(registry, self.database, self.metrics)
        self.shadows = Shadows(self.traffic, self.metrics, self.variant_target, self.send)
        self.vllm = VllmEngine(settings, supervisors, self.metrics)
        self.fleet = self.vllm.fleet  # the vLLM replicas and the routing over them
        self.peft: Any = None  # the embedded PEFT engine, created on first use
        # Only immutable refs are cached (an alias or a bare name is resolved on every request, so
        # a move or a publish is live at once); the last answers, for the names used most recently,
        # serve an outage. Both are LRU-bounded (registry/cache.py).
        self._versions: Lru[str, tuple[float, Any]] = Lru(CACHED_VERSIONS)
        self._last_versions = Remembered(REMEMBERED_VERSIONS)

    # -- routing -------------------------------------------------------------------------------

    def base_target(
        self, tenant: str, experiment: Experiment | None = None, variant: Variant | None = None
    ) -> Target:
        return Target(self.settings.base_name(), ENGINE_VLLM, tenant, True, experiment, variant)

    async def _lookup(self, ref: Ref) -> Any:
        """The registry's answer for ``ref``; its last answer while the database is down."""
        resolve = partial(self.registry.resolve, ref)
        return await self.database.fetch(resolve, str(ref), self._last_versions)

    async def _resolve(self, ref: Ref) -> Any:
        if not ref.immutable:
            return await self._lookup(ref)
        now, name = time.monotonic(), str(ref)
        cached = self._versions.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        info = await self._lookup(ref)
        self._versions[name] = (now + VERSION_TTL, info)
        return info

    async def _adapter_target(
        self, ref: Ref, tenant: str, experiment: Experiment | None = None, variant: Variant | None = None
    ) -> Target:
        info = await self._resolve(ref)
        engine = ENGINE_VLLM if ENGINE_VLLM in info.served_by else ENGINE_PEFT
        return Target(info.ref, engine, tenant, False, experiment, variant)

    async def route(self, model: Any, principal: Principal, user: str | None = None) -> Target:
        """The target ``model`` names for ``principal`` (404 for an unknown one and another
        tenant's alike); a bare name under a running experiment gets ``user``'s variant."""
        if not isinstance(model, str) or not model:
            raise bad_request(
                "'model' is required: the base, tenant/name, tenant/name@N or tenant/name:alias", "model"
            )
        if model.startswith("ft:"):  # a fine-tuning job's result: its immutable ref
            lookup = partial(resolve_fine_tuned, self.registry, model, principal.tenant)
            scoped = f"{principal.tenant or ''}|{model}"  # each caller's answer: a 404 for others
            try:
                model = await self.database.fetch(lookup, scoped, self._last_versions)
            except NotFound:
                raise model_not_found(model) from None
        if model in (self.settings.base_name(), self.settings.base):
            return self.base_target(principal.tenant or "admin")
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
            return await self._adapter_target(ref, ref.tenant)
        except NotFound:
            raise model_not_found(model) from None

    async def variant_target(self, experiment: Experiment, variant: Variant) -> Target:
        if variant.ref is None:  # the registry records the base variant without a ref
            return self.base_target(experiment.tenant, experiment, variant)
        try:
            return await self._adapter_target(parse_ref(variant.ref), experiment.tenant, experiment, variant)
        except NotFound:  # deleted under a running experiment (delete refuses that)
            raise model_not_found(experiment.adapter) from None

    # -- the engines ---------------------------------------------------------------------------

    async def send(self, path: str, body: dict[str, Any], target: Target, outcome: Outcome) -> Response:
        """``body`` to the engine of ``target``; ``outcome`` gets what came back."""
        if target.engine == ENGINE_VLLM:
            return await self.vllm.forward(path, body, target, outcome)
        if self.peft is None:
            from adapterdeck.serve.engines.peft import PeftEngine

            self.peft = PeftEngine(self.settings, self.registry, self.metrics)
        return await self.peft.forward(path, body, target, outcome)

    # -- a completion --------------------------------------------------------------------------

    async def completion(self, path: str, request: Request, principal: Principal) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("The request body is not valid JSON.") from None
        except RecursionError:  # json's C parser gives up on deep nesting this way
            raise bad_request("The request body is nested too deeply.") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        check_request(body, "messages" if path.endswith("chat/completions") else "prompt", self.settings)
        if principal.tenant is None:  # admin keys have no per-tenant limits
            return await self._complete(path, request, body, principal)
        async with self.limiter.slot(principal.tenant) as release_later:
            response = await self._complete(path, request, body, principal)
            if isinstance(response, StreamingResponse):  # the slot is held until the stream ends
                response.body_iterator = then(response.body_iterator, release_later())
            return response

    async def _complete(
        self, path: str, request: Request, body: dict[str, Any], principal: Principal
    ) -> Response:
        target = await self.route(body.get("model"), principal, user_id(body, request))
        labels = target.labels
        started = time.monotonic()
        outcome = Outcome(stream_ended=lambda status: self._answered(target, outcome, status, started))
        status = "error"
        if target.experiment is not None:
            self.traffic.sample(target.experiment, outcome, body)
            if target.experiment.shadow is not None:
                self.shadows.start(path, body, target.experiment)
        try:
            response = await self.send(path, body, target, outcome)
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
            if not outcome.streaming:
                self._answered(target, outcome, int(status) if status.isdigit() else 500, started)

    def _answered(self, target: Target, outcome: Outcome, status: int, started: float) -> None:
        """Count an answer (for a stream, once it is over): its tokens, and the experiment's record."""
        self.metrics.count_usage(target.labels, outcome.usage)
        if target.experiment is not None and target.variant is not None:
            seconds = time.monotonic() - started
            self.traffic.record(target.experiment, target.variant, outcome, status, seconds)
