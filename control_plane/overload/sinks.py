"""Shed requests and fallbacks counted off the access-log stream (xds/als.py), and the saturation gauges.

    llm_gateway_shed_requests_total{model, priority}       requests shed by priority (503 model_overloaded)
    llm_gateway_fallback_requests_total{model, fallback}   requests a fallback model served
    llm_gateway_model_saturation{model}                    0 normal, 1 saturated, 2 severe
    llm_gateway_model_fallback_active{model, fallback}     1 while the model's route goes to the fallback

A shed request carries the shedding filter's metadata (its class); a fallback's request was routed by a
route whose name carries the fallback's id (builders/fallback.py). Labels stay bounded: model labels are
registry ids (or the access-log stream's two fixed values), classes are the three known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control_plane.config.overload import PRIORITIES
from control_plane.config.schema import Registry
from control_plane.state import GatewayState
from control_plane.xds.builders.fallback import fallback_of_route
from control_plane.xds.builders.shedding import SHED_NAMESPACE
from control_plane.xds.log_entries import ModelNames, metadata_fields, string_field

_OTHER = "(other)"


class OverloadCounters:
    """An access-log sink (xds/als.py EntrySink) counting shed requests and fallbacks."""

    def __init__(self, registry: Registry, metrics: CollectorRegistry) -> None:
        self._names = ModelNames(registry)
        self._ids: frozenset[str] = frozenset()
        self.shed = Counter(
            "llm_gateway_shed_requests",
            "Requests refused with 503 model_overloaded by priority while their model was saturated.",
            ["model", "priority"],
            registry=metrics,
        )
        self.fallbacks = Counter(
            "llm_gateway_fallback_requests",
            "Requests for a model served by one of its fallback models.",
            ["model", "fallback"],
            registry=metrics,
        )
        self.follow_registry(registry)

    def follow_registry(self, registry: Registry) -> None:
        self._names.follow_registry(registry)
        self._ids = frozenset(m.id for m in registry.models)

    async def follow(self, registry: Registry) -> None:
        """A registry listener (ControlPlane.add_registry_listener)."""
        self.follow_registry(registry)

    def record(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> str | None:
        """'shed', 'fallback' or None (an entry of another counter)."""
        shed = metadata_fields(entry, SHED_NAMESPACE)
        if shed:
            priority = string_field(shed, "priority") or ""
            label = priority if priority in PRIORITIES else _OTHER
            self.shed.labels(self._names.label(entry), label).inc()
            return "shed"
        fallback = fallback_of_route(entry.common_properties.route_name)
        if fallback is not None:
            target = fallback if fallback in self._ids else _OTHER
            self.fallbacks.labels(self._names.label(entry), target).inc()
            return "fallback"
        return None


class SaturationGauges(Collector):
    """Computed from the live gateway state at every scrape."""

    def __init__(self, state: Callable[[], GatewayState]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        saturation = GaugeMetricFamily(
            "llm_gateway_model_saturation",
            "Saturation level decided from telemetry: 0 normal, 1 saturated (low priority shed), "
            "2 severe (default priority shed too).",
            labels=["model"],
        )
        active = GaugeMetricFamily(
            "llm_gateway_model_fallback_active",
            "1 while the model's requests are routed to this fallback model.",
            labels=["model", "fallback"],
        )
        levels = dict(state.saturation)
        for model in state.models:
            saturation.add_metric([model.id], levels.get(model.id, 0))
        for model_id, fallback_id in state.fallbacks:
            active.add_metric([model_id, fallback_id], 1)
        yield from (saturation, active)
