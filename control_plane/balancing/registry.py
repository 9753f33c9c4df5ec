"""The inputs of a weight policy taken from the registry: endpoint groups (one per model) and static
weights. Feed them to ``WeightController.update(signals, static_weights(r), groups=endpoint_groups(r))``."""

from __future__ import annotations

from control_plane.config.schema import Registry


def endpoint_groups(registry: Registry) -> dict[str, list[str]]:
    """Model id → its endpoint ids: the endpoints that share one Envoy cluster."""
    return {
        model.id: [model.endpoint_id(index) for index in range(len(model.endpoints))]
        for model in registry.models
    }


def static_weights(registry: Registry) -> dict[str, int]:
    """Endpoint id → its static weight from the registry."""
    return {
        model.endpoint_id(index): endpoint.weight
        for model in registry.models
        for index, endpoint in enumerate(model.endpoints)
    }
