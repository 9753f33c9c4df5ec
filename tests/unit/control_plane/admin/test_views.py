"""The endpoint state the status page shows: "serving" only for an endpoint Envoy may use and that is up."""

from __future__ import annotations

import pytest

from control_plane.admin.views import serving_state
from control_plane.state import Health

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("health", "envoy_health", "draining", "drained", "enabled", "expected"),
    [
        ("healthy", Health.HEALTHY, False, None, True, "serving"),
        ("unknown", Health.UNKNOWN, False, None, True, "serving"),  # not probed yet: Envoy routes to it
        ("unhealthy", Health.UNHEALTHY, False, None, True, "unhealthy"),
        ("unhealthy", Health.HEALTHY, False, None, True, "unhealthy"),  # probes failed, push pending
        ("healthy", Health.UNHEALTHY, False, None, True, "unhealthy"),  # what Envoy has says down
        ("healthy", Health.HEALTHY, False, None, False, "disabled"),
        ("healthy", None, False, None, True, "unresolved"),
        ("unhealthy", Health.DRAINING, True, False, True, "draining"),
        ("healthy", Health.DRAINING, True, True, True, "drained"),
    ],
)
def test_serving_only_when_routable_and_up(
    health: str,
    envoy_health: Health | None,
    draining: bool,
    drained: bool | None,
    enabled: bool,
    expected: str,
) -> None:
    state = serving_state(
        health=health, envoy_health=envoy_health, draining=draining, drained=drained, model_enabled=enabled
    )
    assert state == expected
