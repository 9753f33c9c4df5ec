"""The model registry: its schema (pydantic) and the loader that turns a YAML file into it."""

from control_plane.config.loader import load_registry, parse_registry
from control_plane.config.schema import (
    EndpointConfig,
    EngineKind,
    GatewaySettings,
    HealthCheck,
    ModelConfig,
    ModelLimits,
    Registry,
    RetryPolicy,
    Telemetry,
)

__all__ = [
    "EndpointConfig",
    "EngineKind",
    "GatewaySettings",
    "HealthCheck",
    "ModelConfig",
    "ModelLimits",
    "Registry",
    "RetryPolicy",
    "Telemetry",
    "load_registry",
    "parse_registry",
]
