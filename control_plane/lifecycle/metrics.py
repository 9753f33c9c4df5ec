"""The lifecycle's Prometheus metrics, on the control plane's registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900)


@dataclass(frozen=True)
class LifecycleMetrics:
    load_seconds: Histogram
    cold_starts: Counter
    load_failures: Counter
    evictions: Counter
    held: Gauge
    activation_wait: Histogram
    desired_replicas: Gauge
    replicas: Gauge
    restarts: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> LifecycleMetrics:
        registry = registry or CollectorRegistry()
        return cls(
            load_seconds=Histogram(
                "llm_gateway_model_load_seconds",
                "Time from the decision to load a launched model to its first ready replica.",
                buckets=_LOAD_BUCKETS,
                registry=registry,
            ),
            cold_starts=Counter(
                "llm_gateway_model_cold_starts", "Loads of launched models begun.", registry=registry
            ),
            load_failures=Counter(
                "llm_gateway_model_load_failures",
                "Loads that failed (engine exit, timeout, no room).",
                registry=registry,
            ),
            evictions=Counter(
                "llm_gateway_model_evictions",
                "Launched models unloaded by the gateway itself, by reason (budget, idle).",
                ["reason"],
                registry=registry,
            ),
            held=Gauge(
                "llm_gateway_activator_held_requests",
                "Requests in the activator: waiting for their model to load, or being forwarded.",
                registry=registry,
            ),
            activation_wait=Histogram(
                "llm_gateway_activation_wait_seconds",
                "How long requests for a launched model waited in the activator for a ready replica.",
                buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
                registry=registry,
            ),
            # For Kubernetes HPA / KEDA where engines are not launched by the control plane: the replica
            # count the autoscaling policy asks for (every model), beside what runs (launched ones).
            desired_replicas=Gauge(
                "llm_gateway_model_desired_replicas",
                "Replicas a model should have: its autoscaling policy's answer, within "
                "min_replicas..max_replicas (launched: 0 when not loaded and no minimum; a model with "
                "fixed endpoints: from their telemetry, its `scaling` bounds, else their count).",
                ["model"],
                registry=registry,
            ),
            replicas=Gauge(
                "llm_gateway_model_replicas",
                "A launched model's replicas by state (loading, ready, draining, unloading).",
                ["model", "state"],
                registry=registry,
            ),
            restarts=Counter(
                "llm_gateway_model_replica_restarts",
                "Launched replicas replaced, by why (exited, unhealthy).",
                ["model", "reason"],
                registry=registry,
            ),
        )
