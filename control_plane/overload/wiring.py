"""Telemetry rounds → saturation levels → the control plane (shedding levels and fallback switches in the
routes, over RDS), plus the gauges and the access-log counters of control_plane/overload."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from control_plane.config.schema import Registry
from control_plane.overload.saturation import SaturationTracker, model_thresholds
from control_plane.overload.sinks import OverloadCounters, SaturationGauges
from control_plane.service import ControlPlane
from control_plane.state import ACTIVATOR_ENDPOINT_ID
from control_plane.telemetry.signals import EndpointSignals

log = logging.getLogger(__name__)


class OverloadWiring:
    def __init__(
        self,
        plane: ControlPlane,
        metrics: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,  # the clock of EndpointSignals.scraped_at
    ) -> None:
        self._plane = plane
        self._clock = clock
        self.tracker = SaturationTracker()
        self.counters = OverloadCounters(plane.registry, metrics)
        metrics.register(SaturationGauges(lambda: plane.state))
        plane.add_registry_listener(self.counters.follow)

    def on_signals(self, latest: dict[str, EndpointSignals]) -> None:
        """A telemetry listener: called after every scrape round with each endpoint's latest signals."""
        registry: Registry = self._plane.registry
        settings = registry.overload
        if not settings.enabled:
            self._plane.set_saturation({})
            return
        # The plane's state has every model's endpoints, launched replicas included (not the activator,
        # which reports no engine load).
        models = self._plane.state.models
        groups = {m.id: [e.id for e in m.endpoints if e.id != ACTIVATOR_ENDPOINT_ID] for m in models}
        overrides = {
            m.id: (m.overload.saturated, m.overload.severe) if m.overload else (None, None)
            for m in registry.models
        }
        before = self.tracker.levels()
        levels = self.tracker.update(
            groups,
            latest,
            model_thresholds(overrides, settings),
            settings,
            self._clock(),
            registry.telemetry.stale_after_s,
        )
        if levels != before:
            log.info("saturation levels: %s", levels or "none")
        self._plane.set_saturation(levels)
