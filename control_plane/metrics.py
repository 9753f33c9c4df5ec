"""The control plane's own Prometheus metrics, on a registry that is passed in (never the global one)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds, for LLM calls: a short answer in tens of milliseconds up to long generations of minutes.
GENERATE_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


@dataclass(frozen=True)
class ControlPlaneMetrics:
    registry: CollectorRegistry
    xds_pushes: Counter
    xds_nacks: Counter
    xds_connected: Gauge
    snapshot_build_seconds: Histogram
    config_reloads: Counter
    snapshot_inconsistent: Counter
    admin_actions: Counter
    probes: Counter
    alert_notifications: Counter
    auto_actions: Counter
    local_replies: Counter
    generate_requests: Counter
    generate_duration: Histogram
    generate_first_byte: Histogram
    generate_tokens: Counter
    key_requests: Counter
    key_tokens: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> ControlPlaneMetrics:
        registry = registry or CollectorRegistry()
        metrics = cls(
            registry=registry,
            xds_pushes=Counter(
                "llm_gateway_xds_pushes", "xDS responses sent to Envoys.", ["type"], registry=registry
            ),
            xds_nacks=Counter(
                "llm_gateway_xds_nacks", "xDS responses Envoys rejected (NACK).", ["type"], registry=registry
            ),
            xds_connected=Gauge(
                "llm_gateway_xds_connected_envoys", "Envoys with an open ADS stream.", registry=registry
            ),
            snapshot_build_seconds=Histogram(
                "llm_gateway_snapshot_build_seconds",
                "Time to build one Envoy snapshot from the gateway state.",
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            config_reloads=Counter(
                "llm_gateway_config_reloads", "Registry reloads by result.", ["result"], registry=registry
            ),
            snapshot_inconsistent=Counter(
                "llm_gateway_snapshot_inconsistent",
                "Snapshots refused because a reference inside them dangled.",
                registry=registry,
            ),
            admin_actions=Counter(
                "llm_gateway_admin_actions",
                "Changes made through the admin API.",
                ["action"],
                registry=registry,
            ),
            probes=Counter(
                "llm_gateway_health_probes",
                "Health probes by model and result (ok, failed, wrong_model).",
                ["model", "result"],
                registry=registry,
            ),
            alert_notifications=Counter(
                "llm_gateway_alert_notifications",
                "Alertmanager notifications received, by alert and status.",
                ["alertname", "status"],
                registry=registry,
            ),
            auto_actions=Counter(
                "llm_gateway_auto_actions",
                "Automatic actions taken on alerts (drain, undrain, drain_refused).",
                ["action"],
                registry=registry,
            ),
            local_replies=Counter(
                "llm_gateway_local_replies",
                "Error replies Envoy made itself (no model server answered), by model, error code, status "
                "and stage (route: before any cluster, in no Envoy stat; upstream: at the model's cluster, "
                "also in envoy_cluster_upstream_rq_xx). model is (unknown) for a name no model has, (none) "
                "for a request naming none.",
                ["model", "code", "status", "stage"],
                registry=registry,
            ),
            generate_requests=Counter(
                "llm_gateway_generate_requests",
                "Calls of /v1/generate by model, scenario, status and code (ok, the gateway's error code, "
                "upstream_error for an engine's error answer, client_disconnected, stream_interrupted). "
                "scenario is none when the call named none, (none) when it was refused before "
                "translation.",
                ["model", "scenario", "status", "code"],
                registry=registry,
            ),
            generate_duration=Histogram(
                "llm_gateway_generate_duration_seconds",
                "Time from the first byte of a /v1/generate call to the last byte of its answer.",
                ["model", "scenario", "stream"],
                buckets=GENERATE_BUCKETS,
                registry=registry,
            ),
            generate_first_byte=Histogram(
                "llm_gateway_generate_time_to_first_byte_seconds",
                "Time to the first byte of a streamed /v1/generate answer (the first event: about the "
                "time to first token).",
                ["model", "scenario"],
                buckets=GENERATE_BUCKETS,
                registry=registry,
            ),
            generate_tokens=Counter(
                "llm_gateway_generate_tokens",
                "Tokens of /v1/generate calls as the engines reported them, by model, scenario and kind "
                "(prompt: in, completion: out).",
                ["model", "scenario", "kind"],
                registry=registry,
            ),
            key_requests=Counter(
                "llm_gateway_key_requests",
                "Requests per API key (its name; (other) past the label cap), model id and code (ok, the "
                "gateway's error code, upstream_error), from the access-log stream.",
                ["key", "model", "code"],
                registry=registry,
            ),
            key_tokens=Counter(
                "llm_gateway_key_tokens",
                "Tokens per API key, model id and kind (prompt, completion; completion is the request's "
                "max_tokens when the engine reported no usage).",
                ["key", "model", "kind"],
                registry=registry,
            ),
        )
        # Start the counters Envoys may never move at 0, so `increase()` sees the first NACK.
        for type_name in ("cds", "eds", "lds", "rds"):
            metrics.xds_nacks.labels(type_name)
            metrics.xds_pushes.labels(type_name)
        return metrics
