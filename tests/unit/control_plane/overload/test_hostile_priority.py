"""The high-priority route's header match agrees with the shedding filter on odd input: the filter reads
the priority header in any case, so the route must too (else a client's `HIGH`, not shed, would take
the other classes' circuit breakers instead of the reserve). Envoy's own matching of it is in
tests/integration/test_hostile_shedding.py."""

from __future__ import annotations

import pytest

from tests.unit.control_plane.overload.test_overload_builders import _reserved, _routes

pytestmark = pytest.mark.unit


def test_the_high_route_matches_the_header_in_any_case() -> None:
    high = _routes(_reserved())["high:qwen"]
    [header] = high.match.headers
    assert header.name == "x-gateway-priority"
    assert header.string_match.exact == "high" and header.string_match.ignore_case


def test_with_keys_the_header_never_selects_the_high_route() -> None:
    for route in _routes(_reserved("api_key")).values():
        assert not [h for h in route.match.headers if h.name == "x-gateway-priority"], route.name
