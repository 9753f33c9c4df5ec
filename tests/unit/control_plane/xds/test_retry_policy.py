"""The retry settings as rendered for Envoy, and the order of the upstream-failure reply rules.

What they do is shown through a real Envoy in tests/integration/test_failover.py and test_overload.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.config import parse_registry
from control_plane.config.schema import GatewaySettings
from control_plane.errors import ConfigError
from control_plane.state import build_state
from control_plane.xds.builders.cluster import build_cluster
from control_plane.xds.builders.local_reply import reply_rules
from control_plane.xds.builders.retry import retry_policy, route_idle_timeout_s

pytestmark = pytest.mark.unit


def _model(**extra: Any) -> Any:
    doc = {
        "models": [{"id": "m", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:9001"}], **extra}]
    }
    return build_state(parse_registry(doc), lambda host: host).models[0]


def test_defaults_retry_only_failure_causes_with_a_budget_for_a_whole_replica() -> None:
    model = _model(limits={"idle_timeout_s": 7})
    policy = retry_policy(model)
    assert policy.retry_on == "connect-failure,refused-stream,reset"  # no 429/503: "full" is no failure
    assert list(policy.retriable_status_codes) == []
    assert policy.num_retries.value == 2
    assert policy.per_try_idle_timeout.seconds == 7
    assert route_idle_timeout_s(model) == 14  # two silent tries at most: timeout_retries 1
    budget = build_cluster(model).circuit_breakers.thresholds[0].retry_budget
    assert budget.budget_percent.value == 100.0


def test_status_codes_are_retried_only_when_asked() -> None:
    policy = retry_policy(_model(retry={"retriable_status_codes": [503]}))
    assert policy.retry_on.endswith(",retriable-status-codes")
    assert list(policy.retriable_status_codes) == [503]


def test_no_timeout_retries_means_no_per_try_idle_timeout() -> None:
    model = _model(limits={"idle_timeout_s": 5}, retry={"timeout_retries": 0})
    assert not retry_policy(model).HasField("per_try_idle_timeout")
    assert route_idle_timeout_s(model) == 5


@pytest.mark.parametrize(
    ("retry", "message"),
    [
        ({"attempts": 1, "timeout_retries": 2}, "timeout_retries (2) cannot exceed attempts (1)"),
        ({"retriable_status_codes": [429]}, "greater than or equal to 500"),
        ({"budget_percent": 150}, "less than or equal to 100"),
    ],
)
def test_bad_retry_settings_name_their_path(retry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _model(retry=retry)
    assert "models[0].retry" in str(caught.value.problems) and message in str(caught.value.problems)


def test_cause_rules_come_before_the_overload_rule() -> None:
    """A failure whose retry the budget refused carries UO next to its cause's flag: the cause wins."""
    rules = reply_rules(GatewaySettings())
    order = [r.code for r in rules if r.flags]
    overloaded = order.index("model_overloaded")
    for code in ("upstream_timeout", "upstream_reset", "upstream_unavailable"):
        assert order.index(code) < overloaded, order
    flags = {flag: r.code for r in reversed(rules) for flag in r.flags}  # first rule wins
    assert flags == {
        "UH": "model_unavailable",
        "UT": "upstream_timeout",
        "SI": "upstream_timeout",
        "UC": "upstream_reset",
        "UR": "upstream_reset",
        "LR": "upstream_reset",
        "UPE": "upstream_reset",
        "UF": "upstream_unavailable",
        "NC": "upstream_unavailable",
        "URX": "upstream_unavailable",
        "UO": "model_overloaded",
    }
