"""Run-time loops that feed the control plane: health probes and telemetry-driven weights."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control_plane.balancing.policy import WeightController, make_policy
from control_plane.balancing.registry import endpoint_groups, static_weights
from control_plane.config.schema import Registry
from control_plane.health.prober import HealthProber
from control_plane.health.probes import ProbeResult, ProbeTarget
from control_plane.lifecycle.targets import Launched, launched_endpoints
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.state import Health
from control_plane.telemetry.metric_map import load_metric_map
from control_plane.telemetry.scraper import TelemetryCollector, TelemetryScraper, targets_from_registry
from control_plane.telemetry.signals import EndpointSignals

log = logging.getLogger(__name__)


def probe_targets(registry: Registry, launched: Launched | None = None) -> list[ProbeTarget]:
    """The registry's endpoints, then the ready replicas of launched models (`launched`: the plane's
    `inputs.launched`), with their model's health check: a replica is probed like any endpoint."""
    targets = [
        ProbeTarget(model.endpoint_id(i), endpoint.url.rstrip("/"), model, registry.health_check(model))
        for model in registry.models
        for i, endpoint in enumerate(model.endpoints)
    ]
    targets += [
        ProbeTarget(e.id, e.url, e.model, registry.health_check(e.model))
        for e in launched_endpoints(registry, launched or {})
    ]
    return targets


class HealthWiring:
    """Probe results → control-plane health inputs and metrics.

    Follows the registry (a registry listener) and the launched replicas (`launched_changed`, a launched
    listener of the plane), one update of the targets at a time."""

    def __init__(self, plane: ControlPlane, metrics: ControlPlaneMetrics) -> None:
        self._plane = plane
        self._metrics = metrics
        self.prober = HealthProber(on_change=self._on_change, on_result=self._on_result)
        self._following = asyncio.Lock()
        self._probed: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def _on_change(self, endpoint_id: str, health: Health, reason: str) -> None:
        self._plane.set_health(endpoint_id, health)

    def _on_result(self, target: ProbeTarget, result: ProbeResult) -> None:
        outcome = "ok" if result.ok else "wrong_model" if result.wrong_model else "failed"
        self._metrics.probes.labels(target.model.id, outcome).inc()

    async def follow(self, registry: Registry) -> None:
        async with self._following:
            targets = probe_targets(registry, self._plane.inputs.launched)
            await self.prober.update_targets(targets)
            wanted = {t.endpoint_id for t in targets}
            # An endpoint no longer probed has no probed health: a replica started later on the same port
            # (so with the same id) must not inherit the verdict on its predecessor.
            for gone in self._probed - wanted:
                self._plane.inputs.health.pop(gone, None)
            self._probed = wanted

    def launched_changed(self) -> None:
        """A launched model's ready replicas changed (called by the plane, on its loop): probe the new
        ones, stop probing the gone ones."""
        if self._closed:  # shutting down: engines stopping are not probed again
            return
        task = asyncio.get_running_loop().create_task(self._follow_plane())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow_plane(self) -> None:
        try:
            await self.follow(self._plane.registry)
        except Exception:  # the next change retries; the prober keeps its current targets meanwhile
            log.exception("updating the probed launched replicas failed")

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.prober.close()


class EndpointGauges(Collector):
    """Per-model and per-endpoint gauges, computed from the live state at every scrape.

    Health (probes), drains by operators and drains by alerts are separate series, so alert rules can
    tell a broken endpoint from one taken out on purpose, and an alert's own drain does not resolve it.
    """

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "endpoint"]
        healthy = GaugeMetricFamily(
            "llm_gateway_endpoint_healthy",
            "1 if the endpoint passes its health probes (or is not probed yet), 0 if it fails them.",
            labels=labels,
        )
        routable = GaugeMetricFamily(
            "llm_gateway_endpoint_routable",
            "1 if Envoy may send it new requests: healthy, not draining, its model enabled.",
            labels=labels,
        )
        draining = GaugeMetricFamily(
            "llm_gateway_endpoint_draining",
            "1 if an operator drains the endpoint or its model (drains made by alerts are not counted).",
            labels=labels,
        )
        auto_drained = GaugeMetricFamily(
            "llm_gateway_endpoint_auto_drained",
            "1 if an alert's automatic action drains the endpoint.",
            labels=labels,
        )
        weight = GaugeMetricFamily(
            "llm_gateway_endpoint_weight",
            "The load-balancing weight pushed to Envoy for the endpoint.",
            labels=labels,
        )
        enabled = GaugeMetricFamily(
            "llm_gateway_model_enabled", "1 if the model is enabled, 0 if disabled.", labels=["model"]
        )
        plane = self._plane
        by_alert = {row[0] for row in plane.store.rows("SELECT endpoint_id FROM auto_actions")}
        probed = plane.inputs.health
        up = (Health.HEALTHY, Health.UNKNOWN)
        for model in plane.state.models:
            enabled.add_metric([model.id], 1 if model.enabled else 0)
            for endpoint in model.endpoints:
                values = [model.id, endpoint.id]
                in_drain = endpoint.health == Health.DRAINING
                healthy.add_metric(values, 1 if probed.get(endpoint.id, Health.UNKNOWN) in up else 0)
                routable.add_metric(
                    values, 1 if endpoint.health in up and model.enabled and not model.draining else 0
                )
                draining.add_metric(values, 1 if in_drain and endpoint.id not in by_alert else 0)
                auto_drained.add_metric(values, 1 if endpoint.id in by_alert else 0)
                weight.add_metric(values, endpoint.weight)
        yield from (healthy, routable, draining, auto_drained, weight, enabled)


class TelemetryWiring:
    """Scraped signals → weight policy (with hysteresis and a minimum interval) → EDS weights."""

    def __init__(
        self, plane: ControlPlane, scraper: TelemetryScraper, controller: WeightController | None
    ) -> None:
        self._plane = plane
        self._controller = controller
        # Others fed by every round's signals (the overload wiring's saturation decision).
        self.listeners: list[Callable[[dict[str, EndpointSignals]], None]] = []
        self.collector = TelemetryCollector(
            scraper,
            # Read every round: launched replicas come and go between rounds.
            lambda: targets_from_registry(plane.registry, launched=plane.inputs.launched),
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
        for listener in self.listeners:
            listener(latest)
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
