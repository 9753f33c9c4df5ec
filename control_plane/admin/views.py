"""Read models of the admin API: what the control plane knows about each model and endpoint, live."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from control_plane.config.schema import ModelConfig
from control_plane.health.prober import HealthProber
from control_plane.service import ControlPlane
from control_plane.state import EndpointState, Health

# Reports older than this, relative to the start of a drain, do not count as "after the drain".
DRAIN_REPORT_MARGIN_S = 0.2
# A connected node with no load report this long after a drain began is lagging (stuck, or not reporting):
# it no longer holds the verdict for the others (Envoys report every second; its figures, stale after three
# intervals, are left out of in_flight anyway).
DRAIN_LAGGING_AFTER_S = 5.0


class LoadView(Protocol):
    """In-flight requests per upstream address as Envoys report them (LRS)."""

    def in_flight(self, address: str) -> int: ...

    def last_report_age(self, node_id: str) -> float | None: ...


class SignalsView(Protocol):
    """Latest telemetry per endpoint id (objects that are dataclasses)."""

    def latest(self) -> dict[str, Any]: ...


@dataclass
class Observers:
    prober: HealthProber | None = None
    loads: LoadView | None = None
    telemetry: SignalsView | None = None
    # A launched model's lifecycle (state, replicas, reason): control_plane/lifecycle/manager.py.
    lifecycle: Callable[[str], dict[str, Any] | None] | None = None


def drained(plane: ControlPlane, loads: LoadView | None, key: str, addresses: list[str]) -> bool | None:
    """True once every connected Envoy reported, after the drain began, nothing in flight on `addresses`."""
    started = plane.drain_started(key)
    if started is None:
        return None
    if loads is None:
        return None
    now = time.monotonic()
    for node in plane.connected_nodes():
        age = loads.last_report_age(node)
        reported_since_drain = age is not None and now - age >= started + DRAIN_REPORT_MARGIN_S
        if not reported_since_drain and now - started < DRAIN_LAGGING_AFTER_S:
            return False
    return all(loads.in_flight(address) == 0 for address in addresses)


def _as_dict(value: object) -> dict[str, Any] | None:
    if value is None or not dataclasses.is_dataclass(value) or isinstance(value, type):
        return None
    return dataclasses.asdict(cast(Any, value))


def _state_endpoint(plane: ControlPlane, endpoint_id: str) -> EndpointState | None:
    for model in plane.state.models:
        for endpoint in model.endpoints:
            if endpoint.id == endpoint_id:
                return endpoint
    return None


def serving_state(
    *, health: str, envoy_health: Health | None, draining: bool, drained: bool | None, model_enabled: bool
) -> str:
    """What the status page shows for an endpoint, one word. "serving" only when Envoy may send it new
    requests and neither the probes nor the pushed EDS health say it is down (an endpoint not probed yet
    is routable, so it serves)."""
    if draining:
        return "drained" if drained else "draining"
    if envoy_health is None:
        return "unresolved"  # not in the config Envoy has: its host name does not resolve
    if not model_enabled:
        return "disabled"
    if health == Health.UNHEALTHY.value or envoy_health == Health.UNHEALTHY:
        return "unhealthy"
    return "serving"


def endpoint_view(
    plane: ControlPlane, observers: Observers, model: ModelConfig, index: int
) -> dict[str, Any]:
    endpoint_id = model.endpoint_id(index)
    config = model.endpoints[index]
    live = _state_endpoint(plane, endpoint_id)
    address = f"{live.address}:{live.port}" if live else None
    status = observers.prober.status(endpoint_id) if observers.prober else None
    signals = observers.telemetry.latest().get(endpoint_id) if observers.telemetry else None
    draining = endpoint_id in plane.inputs.draining_endpoints or model.id in plane.inputs.draining_models
    loads = observers.loads
    health = status.health.value if status else Health.UNKNOWN.value
    is_drained = drained(plane, loads, f"endpoint:{endpoint_id}", [address]) if draining and address else None
    return {
        "id": endpoint_id,
        "url": config.url,
        "address": address,
        "health": health,
        "reason": (status.reason if status else "") if live else "host name does not resolve",
        "last_probe_at": status.last_probe_at if status else None,
        "weight": live.weight if live else None,
        "static_weight": config.weight,
        "draining": draining,
        "drained": is_drained,
        "state": serving_state(
            health=health,
            envoy_health=live.health if live else None,
            draining=draining,
            drained=is_drained,
            model_enabled=model.enabled,
        ),
        "in_flight": loads.in_flight(address) if loads and address else None,
        "signals": _as_dict(signals),
        "source": "admin" if endpoint_id in plane.applied.admin_endpoints else "file",
    }


def model_view(plane: ControlPlane, observers: Observers, model: ModelConfig) -> dict[str, Any]:
    endpoints = [endpoint_view(plane, observers, model, i) for i in range(len(model.endpoints))]
    draining = model.id in plane.inputs.draining_models
    addresses = [e["address"] for e in endpoints if e["address"]]
    return {
        "id": model.id,
        "aliases": list(model.aliases),
        "engine": model.engine.value,
        "enabled": model.enabled,
        "draining": draining,
        "drained": drained(plane, observers.loads, f"model:{model.id}", addresses) if draining else None,
        "healthy_endpoints": sum(1 for e in endpoints if e["health"] == "healthy" and not e["draining"]),
        "serving_endpoints": sum(1 for e in endpoints if e["state"] == "serving"),
        "in_flight": sum(e["in_flight"] or 0 for e in endpoints) if observers.loads else None,
        "source": "admin" if model.id in plane.applied.admin_models else "file",
        "endpoints": endpoints,
        # cold, loading, ready, draining, unloading, failed for a launched model; ready for any other.
        "state": "ready",
        **_lifecycle(observers, model),
    }


def _lifecycle(observers: Observers, model: ModelConfig) -> dict[str, Any]:
    if model.launch is None or observers.lifecycle is None:
        return {}
    status = observers.lifecycle(model.id)
    if not status:
        return {}
    # Each replica as the prober sees it: ready ones are probed like any endpoint, others not yet or no more.
    replicas = [
        {**replica, **_probed(observers, str(replica["id"]))} for replica in status.get("replicas", [])
    ]
    return {"state": status["state"], "lifecycle": {**status, "replicas": replicas}}


def _probed(observers: Observers, endpoint_id: str) -> dict[str, Any]:
    probed = observers.prober.status(endpoint_id) if observers.prober else None
    return {
        "health": probed.health.value if probed else Health.UNKNOWN.value,
        "health_reason": probed.reason if probed else "not probed",
        "last_probe_at": probed.last_probe_at if probed else None,
    }
