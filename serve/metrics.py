"""Prometheus metrics of the gateway, labelled by tenant, adapter ref and engine, and for requests an
A/B experiment routed, by the experiment (its public name) and the variant (empty otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

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
        self._replica_metrics()
        self.shadow_requests = Counter(
            "adapterdeck_shadow_requests",
            "Copies of experiment traffic sent to a shadow variant (never returned to clients)",
            ("experiment", "variant", "status"),
            registry=self.registry,
        )
        self.experiment_decisions = Counter(
            "adapterdeck_experiment_decisions",
            "Experiments ended by their own rules: a guardrail breach (rollback to the control) or "
            "an automatic promotion",
            ("experiment", "variant", "decision", "metric"),
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

    def _replica_metrics(self) -> None:
        """Per vLLM replica (``serve/fleet/``): its health and load, and the adapters it holds as the
        gateway tracks them (vLLM's own metric forgets idle loaded adapters)."""
        r, replica = self.registry, ("replica",)
        self.replica_up = Gauge(
            "adapterdeck_replica_up", "1 while a vLLM replica is healthy", replica, registry=r
        )
        self.replica_in_flight = Gauge(
            "adapterdeck_replica_in_flight", "Requests in flight on a vLLM replica", replica, registry=r
        )
        self.replica_resident = Gauge(
            "adapterdeck_replica_resident_adapters",
            "Adapters loaded on a vLLM replica (what this gateway sent it, LRU-bounded as vLLM's "
            "cache, and what its /metrics says it runs)",
            replica,
            registry=r,
        )
        self.replica_loads = Counter(
            "adapterdeck_replica_adapter_loads", "Adapters loaded on a vLLM replica", replica, registry=r
        )
        self.replica_evictions = Counter(
            "adapterdeck_replica_adapter_evictions",
            "Adapters pushed out of a vLLM replica's cache by newer ones (its LRU, as tracked)",
            replica,
            registry=r,
        )
        self.replica_cold_start = Histogram(
            "adapterdeck_replica_cold_start_seconds",
            "Latency of the request that loaded an adapter on a vLLM replica",
            replica,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.replica_failures = Counter(
            "adapterdeck_replica_failures",
            "Times a vLLM replica was taken out (a failed request or health check)",
            replica,
            registry=r,
        )
        self.replica_retries = Counter(
            "adapterdeck_replica_retries",
            "Requests retried on another replica after this one failed before answering",
            replica,
            registry=r,
        )

    def count_usage(self, labels: tuple[str, ...], usage: dict[str, Any] | None) -> None:
        """Count an answer's prompt and completion tokens (an answer without usage counts none)."""
        if not usage:
            return
        self.prompt_tokens.labels(*labels).inc(usage.get("prompt_tokens") or 0)
        self.completion_tokens.labels(*labels).inc(usage.get("completion_tokens") or 0)

    def view(self, tenant: str) -> TenantView:
        return TenantView(self.registry, tenant)


class TenantView:
    """The series one tenant may see: its own, and those that name no tenant or adapter at all."""

    def __init__(self, registry: CollectorRegistry, tenant: str) -> None:
        self.registry, self.tenant, self.prefix = registry, tenant, f"{tenant}/"

    def _visible(self, labels: dict[str, str]) -> bool:
        if "tenant" in labels and labels["tenant"] != self.tenant:
            return False
        return all(
            not labels.get(name) or "/" not in labels[name] or labels[name].startswith(self.prefix)
            for name in ("model", "experiment")
        )

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            visible = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            visible.samples = [s for s in metric.samples if self._visible(s.labels)]
            yield visible
