"""Shadow copies: an experiment's shadow variant gets a copy of each request its experiment
routes; its answer is recorded (status, latency, tokens, the start of its output) and never
returned. Copies wait for one of ``SHADOW_CONCURRENCY`` slots; when all are taken a copy is
dropped (and counted), so a shadow never slows the real request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import Response

from adapterdeck.registry.experiments import Experiment, Variant
from adapterdeck.serve.errors import ApiError
from adapterdeck.serve.experiments.traffic import Traffic
from adapterdeck.serve.metrics import Metrics
from adapterdeck.serve.target import Outcome, Target

logger = logging.getLogger("adapterdeck.serve.experiments")
SHADOW_OUTPUT_LIMIT = 4000

Resolve = Callable[[Experiment, Variant], Awaitable[Target]]
Send = Callable[[str, dict[str, Any], Target, Outcome], Awaitable[Response]]


class Shadows:
    """Sends shadow copies: ``resolve`` gives a variant's target, ``send`` calls its engine."""

    def __init__(self, traffic: Traffic, metrics: Metrics, resolve: Resolve, send: Send) -> None:
        self.traffic, self.metrics, self.resolve, self.send = traffic, metrics, resolve, send

    def start(self, path: str, body: dict[str, Any], experiment: Experiment) -> None:
        """Send a copy of the request to the shadow variant, in the background."""
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
        self.traffic.sample(experiment, outcome, body)
        started = time.monotonic()
        async with self.traffic.shadow_slots:
            try:
                target = await self.resolve(experiment, variant)
                response = await self.send(path, copy, target, outcome)
                self.metrics.count_usage(target.labels, outcome.usage)
                status = response.status_code
                if status == 200:
                    choice = (json.loads(bytes(response.body)).get("choices") or [{}])[0]
                    output = (choice.get("message") or {}).get("content") or choice.get("text")
            except ApiError as exc:
                status = exc.status
            except Exception:
                logger.exception("shadow request to %s (%s) failed", variant.name, experiment.adapter)
                return
            finally:
                self.metrics.shadow_requests.labels(experiment.adapter, variant.name, str(status)).inc()
        text = output[:SHADOW_OUTPUT_LIMIT] if isinstance(output, str) else None
        elapsed = time.monotonic() - started
        self.traffic.record(experiment, variant, outcome, status, elapsed, shadow=True, output=text)
