"""Schema of the model registry file (`models.yaml`).

Every model is frozen and forbids unknown keys, so a typo in the file is an error that names its path
instead of a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, field_validator, model_validator

from control_plane.config.auth import AuthSettings
from control_plane.config.base import Frozen, OptionalSeconds, PositiveSeconds
from control_plane.config.cluster_overrides import check_cluster_overrides
from control_plane.config.lifecycle import LaunchSettings, LifecycleSettings, ScalingSettings
from control_plane.config.names import (
    ENDPOINT_ID,
    ENDPOINT_ID_RULE,
    HEADER_NAME,
    MODEL_ID,
    MODEL_ID_RULE,
    check_text,
    check_url_text,
    default_endpoint_id,
)
from control_plane.config.overload import ModelOverload, OverloadSettings, fallback_problems
from control_plane.config.resilience import HealthCheck, ModelLimits, OutlierDetection, RetryPolicy
from control_plane.config.scenarios import Scenario, Scenarios, effective_scenarios


class EngineKind(StrEnum):
    TGI = "tgi"
    VLLM = "vllm"
    SGLANG = "sglang"
    TEI = "tei"


class EndpointConfig(Frozen):
    """One model server replica."""

    id: str | None = Field(default=None, description="Stable id; defaults to '<model id>-<index>'.")
    url: str = Field(description="Base URL of the model server, e.g. http://10.0.0.7:8000")
    weight: int = Field(default=1, ge=1, le=10_000, description="Static load-balancing weight.")
    gpu_metrics_url: str | None = Field(
        default=None,
        description="A DCGM exporter's /metrics for this replica's GPU; default: the server's own /metrics.",
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        if value is not None and not ENDPOINT_ID.fullmatch(value):
            raise ValueError(f"must be {ENDPOINT_ID_RULE}")
        return value

    @field_validator("gpu_metrics_url")
    @classmethod
    def _check_gpu_url(cls, value: str | None) -> str | None:
        return None if value is None else check_url_text(value)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        check_url_text(value)
        parts = urlsplit(value)
        if parts.scheme == "https":
            raise ValueError("https:// model servers are not supported yet; use http:// on a trusted network")
        if parts.scheme != "http":
            raise ValueError("must start with http://")
        if not parts.hostname:
            raise ValueError("has no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"has an invalid port ({exc})") from None
        if port is None:
            raise ValueError("must name a port, e.g. http://10.0.0.7:8000")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must be a bare base URL without a path, query or fragment")
        return value

    # Cached: the state is rebuilt from these on every health change, for every endpoint.
    @cached_property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # guaranteed by the validator
        return host

    @cached_property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None  # guaranteed by the validator
        return port


class Telemetry(Frozen):
    """Scraping of the engines' /metrics and the weights derived from it."""

    enabled: bool = True
    interval_s: PositiveSeconds = 2.0
    timeout_s: PositiveSeconds = 1.0
    # `none` by default: with one Envoy, its full-scan least request beats weights (docs/benchmarks.md);
    # weights pay off when several gateways share model servers or for signals Envoy cannot see.
    policy: str = Field(default="none", description="Weight policy: none | queue | telemetry.")
    max_weight: int = Field(default=100, ge=1, le=10_000)
    min_push_interval_s: OptionalSeconds = 2.0
    hysteresis: float = Field(default=0.2, ge=0, le=10)
    stale_after_s: PositiveSeconds = 10.0


class Alerting(Frozen):
    auto_drain: tuple[str, ...] = Field(
        default=(),
        description="Alerts allowed to drain the endpoint they name (label `endpoint`) while they fire.",
    )

    @field_validator("auto_drain")
    @classmethod
    def _known_alerts(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        from control_plane.alerts.known import unknown_alert_problem  # imports the rules' loader

        problems = [p for p in map(unknown_alert_problem, names) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return names


class ModelConfig(Frozen):
    id: str
    aliases: tuple[str, ...] = ()
    engine: EngineKind
    enabled: bool = True
    load_balancing: Literal["least_request", "round_robin", "prefix_affinity"] = Field(
        default="least_request",
        description="least_request: the replica with the fewest requests in flight (all are compared; "
        "EDS weights scale it); round_robin: in turn; prefix_affinity: requests sharing a prompt prefix "
        "(a conversation, or an explicit `user` / x-session-id hint) go to the same replica, whose prefix "
        "cache holds it, within a bound on load (docs/balancing.md#prefix-affinity).",
    )
    prefix_load_bound_percent: int = Field(
        default=115,
        ge=100,
        le=1000,
        description="prefix_affinity: a replica with more requests in flight than this % of the mean is "
        "passed over (Envoy's hash_balance_factor); lower spreads load more evenly, higher keeps more "
        "requests on their prefix's replica.",
    )
    owned_by: str = "llm-gateway"
    served_model: str | None = Field(
        default=None,
        description="The model name the engine reports (/info model_id, /v1/models ids); default: the id or "
        "any alias.",
    )
    health: HealthCheck | None = Field(default=None, description="Overrides the registry-wide health check.")
    scenarios: Scenarios = Field(
        default_factory=dict, description="/v1/generate scenarios of this model alone, over the registry's."
    )
    # The registry-wide scenarios, set by Registry (a private attribute: not a key of the file).
    _registry_scenarios: dict[str, Scenario] = PrivateAttr(default_factory=dict)
    endpoints: tuple[EndpointConfig, ...] = ()
    launch: LaunchSettings | None = Field(
        default=None,
        description="Engines the control plane starts on demand instead of fixed endpoints "
        "(docs/lifecycle.md).",
    )
    scaling: ScalingSettings | None = Field(
        default=None,
        description="For fixed endpoints that Kubernetes HPA or KEDA scales: bounds and targets of the "
        "exported llm_gateway_model_desired_replicas (docs/lifecycle.md). A launched model sets them in "
        "`launch`.",
    )
    limits: ModelLimits = ModelLimits()
    retry: RetryPolicy = RetryPolicy()
    outlier_detection: OutlierDetection = OutlierDetection()
    cluster_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw Envoy Cluster fields (snake_case names, as in Envoy's YAML) merged over the "
        "generated cluster; an escape hatch for settings the registry does not model.",
    )
    fallbacks: tuple[str, ...] = Field(
        default=(),
        description="Models (ids or aliases) that serve this one's requests, the first available first, "
        "while it has no healthy replica or is saturated (docs/balancing.md, Fallback models).",
    )
    overload: ModelOverload | None = Field(
        default=None, description="This model's saturation thresholds, over the registry's `overload`."
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not MODEL_ID.fullmatch(value):
            raise ValueError(f"must be {MODEL_ID_RULE}")
        return value

    @field_validator("aliases")
    @classmethod
    def _check_aliases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alias in value:
            if not MODEL_ID.fullmatch(alias):
                raise ValueError(f"alias {alias!r} must be {MODEL_ID_RULE}")
        return value

    @field_validator("owned_by", "served_model")
    @classmethod
    def _check_texts(cls, value: str | None) -> str | None:
        return None if value is None else check_text(value)

    @model_validator(mode="after")
    def _launched_or_listed(self) -> ModelConfig:
        if self.launch is not None and self.endpoints:
            raise ValueError("a model with `launch` has no `endpoints`: its replicas are engines it starts")
        if self.launch is not None and self.scaling is not None:
            raise ValueError("a model with `launch` sets its replicas there, not in `scaling`")
        return self

    @field_validator("cluster_overrides")
    @classmethod
    def _check_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_cluster_overrides(value)

    def endpoint_id(self, index: int) -> str:
        """The endpoint's id, or `<model id>-<index>` with characters unfit for an id (such as the `/` of
        `org/model`) replaced by `-`, since ids appear in admin URL paths."""
        endpoint = self.endpoints[index]
        if endpoint.id is not None:
            return endpoint.id
        return default_endpoint_id(self.id, index)

    def serves(self, reported: str) -> bool:
        """Whether a model name reported by an engine is this model."""
        return reported == self.served_model if self.served_model else reported in self.names

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a client may use for this model: its id first, then its aliases."""
        return (self.id, *self.aliases)

    @property
    def generate_scenarios(self) -> dict[str, Scenario]:
        """The /v1/generate scenarios of this model: defaults, the registry's, then its own."""
        return effective_scenarios(self._registry_scenarios, self.scenarios)


class AccessLogSettings(Frozen):
    """Envoy's access log: one line per request to a file, and Envoy's own error replies to the control
    plane (per-model error counts). See docs/operations.md."""

    path: str | None = Field(
        default=None,
        description="File each Envoy appends its access log to (absolute path); none: no file. An Envoy's "
        "node metadata `access_log_path` overrides it.",
    )
    format: Literal["json", "text"] = Field(default="json", description="json: one JSON object per line.")
    count_local_replies: bool = Field(
        default=True,
        description="Stream the errors Envoy answers itself to the control plane (gRPC access log "
        "service), which counts them per model and code (llm_gateway_local_replies_total).",
    )
    count_generate: bool = Field(
        default=True,
        description="Stream every /v1/generate call to the control plane (same stream), which counts "
        "requests, latency and tokens per model and scenario (llm_gateway_generate_*).",
    )


class GatewaySettings(Frozen):
    listen_address: str = "127.0.0.1"
    listen_port: int = Field(default=8080, ge=1, le=65_535)
    max_request_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_request_headers_kb: int = Field(
        default=8,
        ge=2,
        le=96,
        description="Largest request header block Envoy accepts, in KiB (431 request_headers_too_large "
        "above it). Engines refuse much less than Envoy's own 60 KiB (aiohttp and others: an 8 KiB line) "
        "with a plain-text 400, so the gateway refuses first, in its own error shape.",
    )
    stream_idle_timeout_s: PositiveSeconds = 300
    expose_upstream_host: bool = Field(
        default=False,
        description="Add an x-served-by response header with the upstream host:port. It reveals internal "
        "addresses, so it is off unless asked for.",
    )
    model_header: str = Field(default="x-model-id", description="Lower-case header naming the model.")
    request_receive_timeout_s: OptionalSeconds = Field(
        default=10,
        description="Longest time to receive a whole request (headers and body) before Envoy answers 408; "
        "it ends when the request is in, so it never cuts a long generation. 0 = none.",
    )
    request_headers_timeout_s: PositiveSeconds = Field(
        default=5, description="Longest time to receive a request's headers before Envoy answers 408."
    )
    access_log: AccessLogSettings = AccessLogSettings()

    @field_validator("model_header")
    @classmethod
    def _check_model_header(cls, value: str) -> str:
        if not HEADER_NAME.fullmatch(value):
            raise ValueError("must be a lower-case header name: letters a-z, digits and '-'")
        return value

    @field_validator("listen_address")
    @classmethod
    def _check_listen_address(cls, value: str) -> str:
        # Envoy's listener takes an IP literal; anything else would be refused by every Envoy.
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("must be an IPv4 or IPv6 address, e.g. 127.0.0.1 or 0.0.0.0") from None
        return value


class Registry(Frozen):
    allow_empty: bool = Field(
        default=False,
        description="Accept a registry without models (every request would get 404). Without it a file "
        "with no model is refused, at start and on reload.",
    )
    gateway: GatewaySettings = GatewaySettings()
    health: HealthCheck = HealthCheck()
    telemetry: Telemetry = Telemetry()
    alerting: Alerting = Alerting()
    lifecycle: LifecycleSettings = Field(
        default=LifecycleSettings(),
        description="Model directories scanned for models, the GPU memory budget of launched engines.",
    )
    auth: AuthSettings = Field(
        default=AuthSettings(),
        description="API keys: `mode: api_key` makes every request need one (`none`, the default, checks "
        "none); `keys` declares keys by SHA-256, besides those made through the admin API.",
    )
    scenarios: Scenarios = Field(
        default_factory=dict,
        description="/v1/generate prompt templates by name, added to (or replacing) the defaults qa, "
        "summarize and rewrite; see docs/api.md.",
    )
    overload: OverloadSettings = Field(
        default=OverloadSettings(),
        description="Priority classes and shedding of saturated models (docs/balancing.md).",
    )
    models: tuple[ModelConfig, ...] = ()

    @model_validator(mode="after")
    def _share_scenarios(self) -> Registry:
        # Each model carries the registry-wide scenarios, so route building needs the model alone.
        for model in self.models:
            model._registry_scenarios = dict(self.scenarios)
        return self

    @model_validator(mode="after")
    def _check_unique_names(self) -> Registry:
        problems: list[str] = []
        seen_names: dict[str, str] = {}
        seen_endpoints: dict[str, str] = {}
        for m_index, model in enumerate(self.models):
            for n_index, name in enumerate(model.names):
                where = (
                    f"models[{m_index}].id" if n_index == 0 else f"models[{m_index}].aliases[{n_index - 1}]"
                )
                if name in seen_names:
                    problems.append(f"{where}: name {name!r} is already used by {seen_names[name]}")
                else:
                    seen_names[name] = where
            for e_index in range(len(model.endpoints)):
                endpoint_id = model.endpoint_id(e_index)
                where = f"models[{m_index}].endpoints[{e_index}].id"
                if endpoint_id in seen_endpoints:
                    problems.append(
                        f"{where}: endpoint id {endpoint_id!r} is already used by "
                        f"{seen_endpoints[endpoint_id]}"
                    )
                else:
                    seen_endpoints[endpoint_id] = where
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _check_fallbacks(self) -> Registry:
        problems = fallback_problems(self.models)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def health_check(self, model: ModelConfig) -> HealthCheck:
        return model.health or self.health

    def model(self, name: str) -> ModelConfig | None:
        """The model a client name (id or alias) refers to."""
        for model in self.models:
            if name in model.names:
                return model
        return None
