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


TEXT_LIMIT = 20_000  # characters of an answer kept for the live evaluators


@dataclass
class Outcome:
    """What came back, filled in by the engine call. A streamed answer sets ``streaming`` and calls
    ``stream_ended`` with its status (200, or 599 when it broke off) once the stream is over."""

    response_id: str | None = None
    usage: dict[str, Any] | None = None
    streaming: bool = False
    stream_ended: Callable[[int], None] | None = None
    #: Keep the answer's text (the first choice's, up to ``TEXT_LIMIT`` characters) in ``text``:
    #: set when an experiment's live evaluators will score it.
    keep_text: bool = False
    text: str | None = None
    prompt: Any = None  # the request's messages (or prompt), kept with the text

    def answered(self, payload: Any) -> None:
        """Take the id and usage of a JSON answer (and its text, when kept)."""
        if isinstance(payload, dict):
            self.response_id, self.usage = payload.get("id"), payload.get("usage")
            if self.keep_text:
                choice = (payload.get("choices") or [{}])[0]
                if isinstance(choice, dict):
                    message = choice.get("message") or {}
                    text = message.get("content") if isinstance(message, dict) else None
                    text = text if isinstance(text, str) else choice.get("text")
                    self.text = text[:TEXT_LIMIT] if isinstance(text, str) else None

    def streamed(self, chunk: dict[str, Any]) -> None:
        """Add a streamed chunk's text to ``text`` (when kept): the first choice's delta."""
        if not self.keep_text:
            return
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(piece, str) and len(self.text or "") < TEXT_LIMIT:
                self.text = ((self.text or "") + piece)[:TEXT_LIMIT]
