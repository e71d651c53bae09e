"""Prometheus metrics of the gateway, labelled by tenant, adapter ref and engine, and for requests an
A/B experiment routed, by the experiment (its public name) and the variant (empty otherwise)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("tenant", "model", "engine", "experiment", "variant")
        self.requests = Counter(
            "adapterdeck_requests",
            "Requests by outcome",
            (*labels, "endpoint", "status"),
            registry=self.registry,
        )
        self.errors = Counter(
            "adapterdeck_request_errors", "Failed requests", (*labels, "type"), registry=self.registry
        )
        self.latency = Histogram(
            "adapterdeck_request_latency_seconds",
            "Request latency",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "adapterdeck_prompt_tokens", "Prompt tokens", labels, registry=self.registry
        )
        self.completion_tokens = Counter(
            "adapterdeck_completion_tokens", "Completion tokens", labels, registry=self.registry
        )
        self.adapter_loads = Counter(
            "adapterdeck_adapter_loads",
            "Adapters loaded into an engine",
            ("model", "engine"),
            registry=self.registry,
        )
        self.adapter_load_latency = Histogram(
            "adapterdeck_adapter_load_seconds",
            "Latency of the first request to an adapter an engine had not loaded",
            ("engine",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.shadow_requests = Counter(
            "adapterdeck_shadow_requests",
            "Copies of experiment traffic sent to a shadow variant (never returned to clients)",
            ("experiment", "variant", "status"),
            registry=self.registry,
        )
        self.feedback = Counter(
            "adapterdeck_feedback", "Feedback received", ("experiment", "variant"), registry=self.registry
        )
        self.feedback_score = Counter(
            "adapterdeck_feedback_score",
            "Sum of the feedback scores (thumbs up 1, down 0)",
            ("experiment", "variant"),
            registry=self.registry,
        )
