"""Run-time loops that feed the control plane: health probes and telemetry-driven weights."""

from __future__ import annotations

import logging

from control_plane.balancing.policy import WeightController, make_policy
from control_plane.balancing.registry import endpoint_groups, static_weights
from control_plane.config.schema import Registry
from control_plane.health.prober import HealthProber
from control_plane.health.probes import ProbeResult, ProbeTarget
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.state import Health
from control_plane.telemetry.metric_map import load_metric_map
from control_plane.telemetry.scraper import TelemetryCollector, TelemetryScraper, targets_from_registry
from control_plane.telemetry.signals import EndpointSignals

log = logging.getLogger(__name__)


def probe_targets(registry: Registry) -> list[ProbeTarget]:
    return [
        ProbeTarget(model.endpoint_id(i), endpoint.url.rstrip("/"), model, registry.health_check(model))
        for model in registry.models
        for i, endpoint in enumerate(model.endpoints)
    ]


class HealthWiring:
    """Probe results → control-plane health inputs and metrics."""

    def __init__(self, plane: ControlPlane, metrics: ControlPlaneMetrics) -> None:
        self._plane = plane
        self._metrics = metrics
        self.prober = HealthProber(on_change=self._on_change, on_result=self._on_result)

    def _on_change(self, endpoint_id: str, health: Health, reason: str) -> None:
        self._plane.set_health(endpoint_id, health)

    def _on_result(self, target: ProbeTarget, result: ProbeResult) -> None:
        outcome = "ok" if result.ok else "wrong_model" if result.wrong_model else "failed"
        self._metrics.probes.labels(target.model.id, outcome).inc()

    async def follow(self, registry: Registry) -> None:
        await self.prober.update_targets(probe_targets(registry))


def export_endpoint_gauges(plane: ControlPlane, metrics: ControlPlaneMetrics) -> None:
    """Refresh the per-endpoint health and weight gauges from the state pushed to Envoy."""
    metrics.endpoint_healthy.clear()
    metrics.endpoint_weight.clear()
    for model in plane.state.models:
        for endpoint in model.endpoints:
            routable = endpoint.health in (Health.HEALTHY, Health.UNKNOWN) and model.enabled
            metrics.endpoint_healthy.labels(model.id, endpoint.id).set(1 if routable else 0)
            metrics.endpoint_weight.labels(model.id, endpoint.id).set(endpoint.weight)


class TelemetryWiring:
    """Scraped signals → weight policy (with hysteresis and a minimum interval) → EDS weights."""

    def __init__(
        self, plane: ControlPlane, scraper: TelemetryScraper, controller: WeightController | None
    ) -> None:
        self._plane = plane
        self._controller = controller
        self.collector = TelemetryCollector(
            scraper,
            lambda: targets_from_registry(plane.registry),
            interval_s=plane.registry.telemetry.interval_s,
            on_update=self.on_update,
        )

    @classmethod
    def create(cls, plane: ControlPlane) -> TelemetryWiring | None:
        settings = plane.registry.telemetry
        if not settings.enabled:
            return None
        policy = make_policy(settings.policy, settings.max_weight)
        controller = (
            WeightController(
                policy,
                min_interval_s=settings.min_push_interval_s,
                hysteresis=settings.hysteresis,
                max_age_s=settings.stale_after_s,
            )
            if policy is not None
            else None
        )
        return cls(plane, TelemetryScraper(load_metric_map(None), timeout_s=settings.timeout_s), controller)

    def on_update(self, latest: dict[str, EndpointSignals]) -> None:
        if self._controller is None:
            return
        registry = self._plane.registry
        weights = self._controller.update(
            latest,
            static_weights(registry),
            groups=endpoint_groups(registry),
            max_age_s=registry.telemetry.stale_after_s,
        )
        if weights is not None:
            log.info("telemetry weights: %s", weights)
            self._plane.set_weights(weights)

    def start(self) -> None:
        self.collector.start()

    async def stop(self) -> None:
        await self.collector.stop()
        await self.collector.scraper.close()
