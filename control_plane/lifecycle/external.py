"""The desired replica count of models whose engines someone else runs (fixed `endpoints`), for Kubernetes
HPA or KEDA to act on (docs/lifecycle.md, "For Kubernetes HPA or KEDA").

Once a tick (lifecycle/wiring.py), for every model without `launch`:
- with a `scaling` section, its routable endpoints (not unhealthy, not draining) are its ready replicas;
  their /metrics (and DCGM exporter, if one is set) and Envoy's requests in flight on them are read like a
  launched model's replicas, and the same `ScalingPolicy` (lifecycle/autoscale.py), bounded by the section's
  `min_replicas` and `max_replicas`, says how many it should have;
- without one, the count is the endpoints the registry lists: the gateway has no opinion to add.
The answer is exported as `llm_gateway_model_desired_replicas{model}`, the launched models' metric, so
one KEDA `prometheus` trigger or HPA external metric serves both.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from control_plane.config.schema import Registry
from control_plane.lifecycle.autoscale import QueueDepthPolicy, ReplicaSignalReader, ScalingPolicy
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.state import GatewayState, Health
from control_plane.telemetry.scraper import targets_from_registry

log = logging.getLogger(__name__)

_OUT = (Health.UNHEALTHY, Health.DRAINING)


class EndpointScaling:
    def __init__(
        self,
        signals: ReplicaSignalReader,
        metrics: LifecycleMetrics,
        policy: ScalingPolicy | None = None,
    ) -> None:
        self._signals = signals
        self._metrics = metrics
        self._policy = policy or QueueDepthPolicy()
        self._desired: dict[str, int] = {}

    def desired(self) -> dict[str, int]:
        """The last answer per model (for the admin API)."""
        return dict(self._desired)

    async def tick(self, registry: Registry, state: GatewayState) -> None:
        fixed = [m for m in registry.models if m.launch is None]
        models = {m.id: m for m in state.models}
        targets = {t.endpoint_id: t for t in targets_from_registry(registry)}
        for model in fixed:
            if model.scaling is None:
                desired = len(model.endpoints)
            else:
                served = models.get(model.id)
                routable = [e for e in (served.endpoints if served else ()) if e.health not in _OUT]
                signals = await self._signals.read_targets(
                    [targets[e.id] for e in routable if e.id in targets],
                    [f"{e.address}:{e.port}" for e in routable],
                )
                desired = self._policy.desired(model.id, signals, model.scaling)
            if self._desired.get(model.id) != desired:
                log.info("model %s: desired replicas %s → %d", model.id, self._desired.get(model.id), desired)
            self._desired[model.id] = desired
            self._metrics.desired_replicas.labels(model.id).set(desired)
        listed = {m.id for m in registry.models}
        for gone in set(self._desired) - {m.id for m in fixed}:
            self._forget(gone, drop_gauge=gone not in listed)  # a model now launched: its scaler's gauge

    def _forget(self, model_id: str, drop_gauge: bool) -> None:
        self._desired.pop(model_id, None)
        self._policy.forget(model_id)
        if drop_gauge:
            with contextlib.suppress(KeyError):
                self._metrics.desired_replicas.remove(model_id)

    async def close(self) -> None:
        await self._signals.close()

    def overview(self, registry: Registry) -> dict[str, dict[str, Any]]:
        """Per model with fixed endpoints: what it should have, and the bounds it was computed within."""
        view: dict[str, dict[str, Any]] = {}
        for model in registry.models:
            if model.launch is not None or model.id not in self._desired:
                continue
            scaling = model.scaling
            view[model.id] = {
                "desired_replicas": self._desired[model.id],
                "endpoints": len(model.endpoints),
                "min_replicas": scaling.min_replicas if scaling else None,
                "max_replicas": scaling.max_replicas if scaling else None,
            }
        return view
