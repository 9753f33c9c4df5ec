"""Schema of the model registry file (`models.yaml`).

Every model is frozen and forbids unknown keys, so a typo in the file is an error that names its path
instead of a silently ignored setting.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Model ids travel in JSON bodies, headers and Envoy metadata; keep them printable and bounded.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
_ENDPOINT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_UNFIT_IN_ID = re.compile(r"[^A-Za-z0-9._-]")


class EngineKind(StrEnum):
    TGI = "tgi"
    VLLM = "vllm"
    SGLANG = "sglang"
    TEI = "tei"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]
# 0 turns a timeout off; Envoy takes the same convention.
OptionalSeconds = Annotated[float, Field(ge=0, le=86_400)]


class EndpointConfig(_Frozen):
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
        if value is not None and not _ENDPOINT_ID.match(value):
            raise ValueError("must be 1-100 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
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


class HealthCheck(_Frozen):
    """Active probing of every endpoint: the engine's health call, then a check of the model it serves."""

    interval_s: PositiveSeconds = 2.0
    timeout_s: PositiveSeconds = 1.0
    unhealthy_threshold: int = Field(
        default=2, ge=1, le=100, description="Failures in a row to mark it down."
    )
    healthy_threshold: int = Field(
        default=1, ge=1, le=100, description="Successes in a row to bring it back."
    )
    jitter: float = Field(
        default=0.1, ge=0, le=1, description="Random spread of the interval, as a fraction."
    )
    check_model: bool = Field(default=True, description="Refuse an endpoint that serves another model.")


class Telemetry(_Frozen):
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


class Alerting(_Frozen):
    auto_drain: tuple[str, ...] = Field(
        default=(),
        description="Alerts allowed to drain the endpoint they name (label `endpoint`) while they fire.",
    )


class ModelLimits(_Frozen):
    """Per-model limits, enforced by Envoy's circuit breakers and route timeouts."""

    max_concurrent_requests: int = Field(default=256, ge=1, le=1_000_000)
    max_pending_requests: int = Field(default=512, ge=0, le=1_000_000)
    request_timeout_s: OptionalSeconds = Field(
        default=600, description="Whole request, streams included; 0 = none."
    )
    idle_timeout_s: PositiveSeconds = Field(
        default=120, description="Longest silence of the upstream before the stream is cut."
    )
    connect_timeout_s: PositiveSeconds = 2.0


class RetryPolicy(_Frozen):
    """Retries on another host, only where no byte has reached the client yet."""

    attempts: int = Field(default=2, ge=0, le=10, description="Retries after the first try.")
    budget_percent: float = Field(
        default=20.0, ge=0, le=100, description="Retries may be at most this share of active requests."
    )
    min_retry_concurrency: int = Field(default=3, ge=0, le=10_000)


class OutlierDetection(_Frozen):
    consecutive_5xx: int = Field(default=5, ge=1)
    consecutive_local_origin_failure: int = Field(default=2, ge=1)
    interval_s: PositiveSeconds = 2.0
    base_ejection_time_s: PositiveSeconds = 10.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


class ModelConfig(_Frozen):
    id: str
    aliases: tuple[str, ...] = ()
    engine: EngineKind
    enabled: bool = True
    load_balancing: Literal["least_request", "round_robin"] = Field(
        default="least_request",
        description="least_request: the replica with the fewest requests in flight (all are compared; "
        "EDS weights scale it); round_robin: in turn.",
    )
    owned_by: str = "llm-gateway"
    served_model: str | None = Field(
        default=None,
        description="The model name the engine reports (/info model_id, /v1/models ids); default: the id or "
        "any alias.",
    )
    health: HealthCheck | None = Field(default=None, description="Overrides the registry-wide health check.")
    endpoints: tuple[EndpointConfig, ...] = ()
    limits: ModelLimits = ModelLimits()
    retry: RetryPolicy = RetryPolicy()
    outlier_detection: OutlierDetection = OutlierDetection()
    cluster_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw Envoy Cluster fields (snake_case names, as in Envoy's YAML) merged over the "
        "generated cluster; an escape hatch for settings the registry does not model.",
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _MODEL_ID.match(value):
            raise ValueError("must be 1-200 characters: letters, digits and . _ : / @ + - (no spaces)")
        return value

    @field_validator("aliases")
    @classmethod
    def _check_aliases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alias in value:
            if not _MODEL_ID.match(alias):
                raise ValueError(
                    f"alias {alias!r} must be 1-200 characters: letters, digits and . _ : / @ + -"
                )
        return value

    @field_validator("cluster_overrides")
    @classmethod
    def _check_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Parse now so that a typo fails the load with its path; Envoy still validates the values.
        from envoy.config.cluster.v3 import cluster_pb2
        from google.protobuf import json_format

        from control_plane.xds.builders._common import register_extension_types

        register_extension_types()

        try:
            json_format.ParseDict(value, cluster_pb2.Cluster())
        except json_format.ParseError as exc:
            raise ValueError(f"not a valid Envoy Cluster fragment: {exc}") from None
        return value

    def endpoint_id(self, index: int) -> str:
        """The endpoint's id, or `<model id>-<index>` with characters unfit for an id (such as the `/` of
        `org/model`) replaced by `-`, since ids appear in admin URL paths."""
        endpoint = self.endpoints[index]
        if endpoint.id is not None:
            return endpoint.id
        return _UNFIT_IN_ID.sub("-", f"{self.id}-{index}")[-100:].lstrip("-._") or f"endpoint-{index}"

    def serves(self, reported: str) -> bool:
        """Whether a model name reported by an engine is this model."""
        return reported == self.served_model if self.served_model else reported in self.names

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a client may use for this model: its id first, then its aliases."""
        return (self.id, *self.aliases)


class GatewaySettings(_Frozen):
    listen_address: str = "127.0.0.1"
    listen_port: int = Field(default=8080, ge=1, le=65_535)
    max_request_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    stream_idle_timeout_s: PositiveSeconds = 300
    expose_upstream_host: bool = Field(
        default=False,
        description="Add an x-served-by response header with the upstream host:port. It reveals internal "
        "addresses, so it is off unless asked for.",
    )
    model_header: str = Field(default="x-model-id", pattern=r"^[a-z0-9-]+$")


class Registry(_Frozen):
    gateway: GatewaySettings = GatewaySettings()
    health: HealthCheck = HealthCheck()
    telemetry: Telemetry = Telemetry()
    alerting: Alerting = Alerting()
    models: tuple[ModelConfig, ...] = ()

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

    def health_check(self, model: ModelConfig) -> HealthCheck:
        return model.health or self.health

    def model(self, name: str) -> ModelConfig | None:
        """The model a client name (id or alias) refers to."""
        for model in self.models:
            if name in model.names:
                return model
        return None
