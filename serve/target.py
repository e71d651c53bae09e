"""Where a request goes (``Target``) and what came back (``Outcome``): what the gateway, the engines
and the experiment recorder pass each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapterdeck.registry.experiments import Experiment, Variant

REF_HEADER = "X-Adapterdeck-Ref"
EXPERIMENT_HEADER = "X-Adapterdeck-Experiment"
VARIANT_HEADER = "X-Adapterdeck-Variant"
REPLICA_HEADER = "X-Adapterdeck-Replica"  # the vLLM replica that answered (its id in /health)


@dataclass(frozen=True)
class Target:
    """An engine target: the model name the engine serves (an immutable ``tenant/name@N``, or the
    base's served name), the engine, the tenant it is served for, and the experiment variant it
    plays (when an experiment routed it). The base is a target like any adapter; ``is_base`` only
    says that no adapter has to be loaded for it."""

    name: str
    engine: str
    tenant: str
    is_base: bool = False
    experiment: Experiment | None = None
    variant: Variant | None = None

    @property
    def labels(self) -> tuple[str, str, str, str, str]:
        experiment = self.experiment.adapter if self.experiment else ""
        return (self.tenant, self.name, self.engine, experiment, self.variant.name if self.variant else "")

    @property
    def headers(self) -> dict[str, str]:
        if self.experiment is None or self.variant is None:
            return {REF_HEADER: self.name}
        return {
            REF_HEADER: self.name,
            EXPERIMENT_HEADER: self.experiment.adapter,
            VARIANT_HEADER: self.variant.name,
        }


@dataclass
class Outcome:
    """What came back, filled in by the engine call. A streamed answer sets ``streaming`` and calls
    ``stream_ended`` with its status (200, or 599 when it broke off) once the stream is over."""

    response_id: str | None = None
    usage: dict[str, Any] | None = None
    streaming: bool = False
    stream_ended: Callable[[int], None] | None = None

    def answered(self, payload: Any) -> None:
        """Take the id and usage of a JSON answer."""
        if isinstance(payload, dict):
            self.response_id, self.usage = payload.get("id"), payload.get("usage")
