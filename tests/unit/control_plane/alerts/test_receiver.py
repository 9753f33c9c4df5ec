"""Alertmanager notifications: recorded, and acted on only where allowed, reversibly and within bounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from control_plane.admin.operations import AdminOperations
from control_plane.alerts.known import known_alerts
from control_plane.alerts.receiver import AlertReceiver, Notification, UnknownAlertError
from control_plane.config import parse_registry
from control_plane.errors import ConfigError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.observability.runbooks import REQUIRED_ALERTS
from control_plane.service import ControlPlane
from control_plane.state import Health
from control_plane.xds.cache import SnapshotCache

pytestmark = pytest.mark.unit


def setup(
    auto_drain: tuple[str, ...] = ("EndpointDown",),
) -> tuple[ControlPlane, AlertReceiver, ControlPlaneMetrics]:
    registry = parse_registry(
        {
            "alerting": {"auto_drain": list(auto_drain)},
            "models": [
                {
                    "id": "m",
                    "engine": "vllm",
                    "endpoints": [
                        {"id": "a", "url": "http://127.0.0.1:1"},
                        {"id": "b", "url": "http://127.0.0.1:2"},
                    ],
                }
            ],
        }
    )
    metrics = ControlPlaneMetrics.create()
    plane = ControlPlane(registry, cache=SnapshotCache(), metrics=metrics, resolver=lambda h: h)
    return plane, AlertReceiver(plane, AdminOperations(plane, metrics), metrics), metrics


def note(status: str, name: str = "EndpointDown", endpoint: str = "a") -> Notification:
    labels = {"alertname": name, "model": "m", "endpoint": endpoint}
    return Notification.model_validate(
        {
            "status": status,
            "alerts": [
                {
                    "status": status,
                    "labels": labels,
                    "annotations": {"summary": "x"},
                    "startsAt": "2026-11-21T00:00:00Z",
                    "fingerprint": "f1",
                }
            ],
        }
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_firing_drains_and_resolving_undrains() -> None:
    plane, receiver, metrics = setup()
    assert run(receiver.handle(note("firing"))) == [
        {"alertname": "EndpointDown", "status": "firing", "action": "drained a"}
    ]
    assert plane.inputs.draining_endpoints == {"a"}
    assert receiver.pending_undrains()[0]["endpoint"] == "a"
    assert run(receiver.handle(note("resolved")))[0]["action"] == "undrained a"
    assert plane.inputs.draining_endpoints == frozenset()
    recent = receiver.recent()
    assert [r["status"] for r in recent] == ["resolved", "firing"]
    assert recent[1]["labels"]["endpoint"] == "a" and recent[1]["action"] == "drained a"
    assert metrics.registry.get_sample_value("llm_gateway_auto_actions_total", {"action": "drain"}) == 1
    assert [e["action"] for e in plane.store.audit()][:3] == [
        "alert.resolved",
        "auto.release",
        "endpoint.draining",
    ]
    # Every entry the notifications caused names the alert as its actor.
    assert {e["actor"] for e in plane.store.audit()} == {"alertmanager:EndpointDown"}


def test_alerts_not_allowed_to_act_are_only_recorded() -> None:
    plane, receiver, _ = setup(auto_drain=())
    assert run(receiver.handle(note("firing")))[0]["action"] is None
    assert plane.inputs.draining_endpoints == frozenset()
    receiver.set_auto_drain("EndpointDown", True)  # the operator turns it on
    assert run(receiver.handle(note("firing")))[0]["action"] == "drained a"
    receiver.set_auto_drain("EndpointDown", False)
    assert "EndpointDown" not in receiver.auto_drain_alerts()


def test_auto_drain_naming_no_known_alert_is_refused() -> None:
    _, receiver, _ = setup(auto_drain=())
    with pytest.raises(UnknownAlertError, match="EndpointDown"):  # the message lists the known ones
        receiver.set_auto_drain("EndpointDwn", True)
    assert "EndpointDwn" not in receiver.auto_drain_alerts()
    with pytest.raises(ConfigError, match=r"alerting\.auto_drain: no alert is named 'Nope'"):
        parse_registry(
            {
                "models": [{"id": "m", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:1"}]}],
                "alerting": {"auto_drain": ["Nope"]},
            },
            "models.yaml",
        )
    # Every alert the shipped rules define is accepted.
    assert set(known_alerts()) >= REQUIRED_ALERTS
    for name in known_alerts():
        receiver.set_auto_drain(name, True)


def test_the_last_routable_endpoint_is_never_drained() -> None:
    plane, receiver, metrics = setup()
    plane.set_health("b", Health.UNHEALTHY)
    action = run(receiver.handle(note("firing")))[0]["action"]
    assert action.startswith("refused") and plane.inputs.draining_endpoints == frozenset()
    assert (
        metrics.registry.get_sample_value("llm_gateway_auto_actions_total", {"action": "drain_refused"}) == 1
    )
    # With a peer back, it drains; the peer then cannot be drained too.
    plane.set_health("b", Health.HEALTHY)
    assert run(receiver.handle(note("firing")))[0]["action"] == "drained a"
    assert run(receiver.handle(note("firing", endpoint="b")))[0]["action"].startswith("refused")


def test_an_operators_undrain_cancels_the_automatic_one() -> None:
    plane, receiver, _ = setup()
    run(receiver.handle(note("firing")))
    receiver.forget_endpoint("a")
    run(AdminOperations(plane, ControlPlaneMetrics.create()).set_endpoint_draining("a", True))  # by hand now
    assert "was not drained by" in run(receiver.handle(note("resolved")))[0]["action"]
    assert plane.inputs.draining_endpoints == {"a"}  # the operator's drain stands


def test_unknown_endpoint_and_alert_without_endpoint() -> None:
    _, receiver, _ = setup()
    assert run(receiver.handle(note("firing", endpoint="zz")))[0]["action"] == "none: no endpoint 'zz'"
    plain = Notification.model_validate(
        {"status": "firing", "alerts": [{"status": "firing", "labels": {"alertname": "EndpointDown"}}]}
    )
    assert run(receiver.handle(plain))[0]["action"] is None


def test_gauges_tell_probe_health_operator_drains_and_alert_drains_apart() -> None:
    from prometheus_client import CollectorRegistry

    from control_plane.runtime import EndpointGauges

    plane, receiver, _ = setup()
    registry = CollectorRegistry()
    registry.register(EndpointGauges(plane))

    def value(name: str, endpoint: str) -> float | None:
        return registry.get_sample_value(name, {"model": "m", "endpoint": endpoint})

    plane.set_health("a", Health.UNHEALTHY)
    plane.set_health("b", Health.HEALTHY)
    run(receiver.handle(note("firing")))  # drains a, automatically
    run(AdminOperations(plane, ControlPlaneMetrics.create()).set_endpoint_draining("b", True))  # an operator
    assert (value("llm_gateway_endpoint_healthy", "a"), value("llm_gateway_endpoint_healthy", "b")) == (0, 1)
    assert (value("llm_gateway_endpoint_draining", "a"), value("llm_gateway_endpoint_draining", "b")) == (
        0,
        1,
    )
    assert (
        value("llm_gateway_endpoint_auto_drained", "a"),
        value("llm_gateway_endpoint_auto_drained", "b"),
    ) == (1, 0)
    assert (
        value("llm_gateway_endpoint_routable", "a") == 0 and value("llm_gateway_endpoint_routable", "b") == 0
    )
    assert registry.get_sample_value("llm_gateway_model_enabled", {"model": "m"}) == 1
