"""Which model serves a model's requests: itself, or the first of its fallbacks that can take them.

Pure: the models' state (health of their endpoints, flags) and the saturation levels in, the switches out.
A model falls back while it is unavailable (no endpoint healthy or not yet probed: all down, or none) or
saturated, to the first fallback that is available and not saturated; with none such it keeps its own
route (its requests get the 503 of an unavailable model, or are shed by priority). Only one hop: a
model's route goes to its fallback's cluster, never through the fallback's own route, so a fallback's own
fallbacks are not followed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from control_plane.state import ModelState

# EDS health values that let Envoy send the endpoint requests (state.Health; UNKNOWN: not probed yet,
# such as a launched model's activator, which starts the model for the request it holds).
_ROUTABLE = frozenset({"healthy", "unknown"})


def available(model: ModelState) -> bool:
    """Whether Envoy can send the model's requests to one of its endpoints."""
    if not model.enabled or model.draining:
        return False
    return any(str(e.health) in _ROUTABLE for e in model.endpoints)


def choose_fallbacks(
    models: Sequence[ModelState], saturation: Mapping[str, int]
) -> tuple[tuple[str, str], ...]:
    """(model id, fallback id) for every model that falls back now, in registry order."""
    by_name = {name: m for m in models for name in m.config.names}
    chosen = []
    for model in models:
        # A disabled or draining model keeps its 503: an operator took it out on purpose.
        if not model.config.fallbacks or not model.enabled or model.draining:
            continue
        if available(model) and not saturation.get(model.id, 0):
            continue
        for name in model.config.fallbacks:
            target = by_name.get(name)
            if target is not None and available(target) and not saturation.get(target.id, 0):
                chosen.append((model.id, target.id))
                break
    return tuple(chosen)
