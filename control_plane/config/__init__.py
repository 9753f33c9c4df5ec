"""The model registry: its schema (pydantic) and the loader that turns a YAML file into it."""

from control_plane.config.loader import load_registry, parse_registry
from control_plane.config.schema import (
    EndpointConfig,
    EngineKind,
    GatewaySettings,
    ModelConfig,
    ModelLimits,
    Registry,
    RetryPolicy,
)

__all__ = [
    "EndpointConfig",
    "EngineKind",
    "GatewaySettings",
    "ModelConfig",
    "ModelLimits",
    "Registry",
    "RetryPolicy",
    "load_registry",
    "parse_registry",
]
