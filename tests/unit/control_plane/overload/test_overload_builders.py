"""The Envoy side of overload control as built: the shedding filter turned on per route (for saturated
models only; not for a model switched to a fallback), the fallback routes (cluster, rename
data, headers, a countable name), the shed reply's rule and the counters fed by the access-log stream."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.overload.sinks import OverloadCounters, SaturationGauges
from control_plane.state import Health, NodeParams, StateInputs, build_state
from control_plane.xds.als import LocalReplyCounter
from control_plane.xds.builders import build_snapshot
from control_plane.xds.builders.generate import RENAME_FILTER_NAME
from control_plane.xds.builders.local_reply import reply_rules
from control_plane.xds.builders.shedding import SHED_FILTER_NAME, SHED_NAMESPACE, shed_levels
from control_plane.xds.resources import CLUSTER, EXTENSION_CONFIG, LISTENER, ROUTE

pytestmark = pytest.mark.unit

REGISTRY = parse_registry(
    {
        "overload": {"priority_header": True, "retry_after_s": 3},
        "models": [
            {
                "id": "qwen2",
                "aliases": ["qwen"],
                "engine": "vllm",
                "endpoints": [{"url": "http://127.0.0.1:1"}],
                "fallbacks": ["small"],
            },
            {
                "id": "small",
                "engine": "vllm",
                "served_model": "org/small-1b",
                "endpoints": [{"url": "http://127.0.0.1:2"}],
            },
        ],
    }
)


def _state(saturation: dict[str, int] | None = None, health: dict[str, Health] | None = None) -> Any:
    inputs = StateInputs(saturation=saturation or {}, health=health or {})
    return build_state(REGISTRY, lambda host: host, inputs)


def _routes(state: Any) -> dict[str, Any]:
    config = build_snapshot(state, NodeParams()).resources[ROUTE]["gateway"]
    assert isinstance(config, route_pb2.RouteConfiguration)
    return {r.name: r for r in config.virtual_hosts[0].routes}


def _shed_data(route: Any) -> dict[str, Any]:
    if SHED_FILTER_NAME not in route.typed_per_filter_config:
        return {}
    per_route = lua_pb2.LuaPerRoute()
    route.typed_per_filter_config[SHED_FILTER_NAME].Unpack(per_route)
    assert per_route.name == "shed"
    return json_format.MessageToDict(route.metadata.filter_metadata[SHED_FILTER_NAME])


def test_nothing_saturated_no_route_enters_the_filter() -> None:
    assert shed_levels(_state()) == {}
    assert not any(_shed_data(r) for r in _routes(_state()).values())


def test_every_route_of_a_saturated_model_enters_it_with_its_level() -> None:
    both = _state({"qwen2": 2, "small": 1})  # the fallback is saturated too: no switch
    assert both.fallbacks == ()
    assert shed_levels(both) == {"qwen2": 2, "small": 1}
    routes = _routes(both)
    expected = {"model": "qwen2", "level": 2.0, "retry_after": "3", "header": "x-gateway-priority"}
    assert _shed_data(routes["model:qwen"]) == _shed_data(routes["model:qwen2"]) == expected
    assert _shed_data(routes["model:small"])["level"] == 1
    assert not _shed_data(routes["models"])  # Envoy's own answers never


def test_a_model_switched_to_its_fallback_is_not_shed() -> None:
    state = _state({"qwen2": 1})
    assert state.fallbacks == (("qwen2", "small"),)
    assert shed_levels(state) == {}


def test_without_the_registrys_leave_the_header_is_not_read() -> None:
    overload = REGISTRY.overload.model_copy(update={"priority_header": False})
    state = build_state(
        REGISTRY.model_copy(update={"overload": overload}),
        lambda host: host,
        StateInputs(saturation={"small": 1}),
    )
    assert "header" not in _shed_data(_routes(state)["model:small"])


def test_the_filter_is_in_every_listener_with_no_default_code() -> None:
    snapshot = build_snapshot(_state(), NodeParams())
    manager = hcm.HttpConnectionManager()
    next(iter(snapshot.resources[LISTENER].values())).filter_chains[0].filters[0].typed_config.Unpack(manager)
    names = [f.name for f in manager.http_filters]
    assert names.index(SHED_FILTER_NAME) < names.index("envoy.filters.http.router")
    lua = lua_pb2.Lua()
    manager.http_filters[names.index(SHED_FILTER_NAME)].typed_config.Unpack(lua)
    assert not lua.HasField("default_source_code") and set(lua.source_codes) == {"shed"}
    assert not snapshot.resources[EXTENSION_CONFIG]  # no ECDS resource without keys
    assert snapshot.consistency_problems() == []


def test_a_dead_model_is_routed_to_its_fallback_with_the_body_renamed() -> None:
    assert "model:qwen" in _routes(_state())
    routes = _routes(_state(health={"qwen2-0": Health.UNHEALTHY}))
    assert "model:qwen" not in routes and "model:qwen2" not in routes
    route = routes["fallback:qwen>small"]
    assert route.route.cluster == "model_small"
    served = route.metadata.filter_metadata[RENAME_FILTER_NAME].fields["served_model"].string_value
    assert served == "org/small-1b"
    assert RENAME_FILTER_NAME in route.typed_per_filter_config
    headers = {h.header.key: h.header.value for h in route.response_headers_to_add}
    assert headers == {"x-gateway-model": "small", "x-gateway-fallback-from": "qwen2"}
    assert {h.header.key: h.header.value for h in route.request_headers_to_add}["x-gateway-model"] == "small"
    # The match and the retry policy are the model's own.
    assert route.match == _routes(_state())["model:qwen"].match
    assert route.route.retry_policy.num_retries.value == 2


def test_the_shed_reply_is_model_overloaded_and_counted_as_a_route_reply() -> None:
    rule = next(r for r in reply_rules(REGISTRY.gateway) if r.route_cel and SHED_NAMESPACE in r.route_cel)
    assert rule.code == "model_overloaded" and rule.error_type == "server_error"
    entry = _entry("qwen", status=503, shed="low")
    entry.response.response_headers["x-gateway-error-code"] = "model_overloaded"
    reply = LocalReplyCounter(ControlPlaneMetrics.create(), REGISTRY).classify(entry)
    assert (reply.model, reply.code, reply.stage) == ("qwen2", "model_overloaded", "route")


def _entry(model: str, status: int = 200, shed: str | None = None, route: str = "") -> Any:
    out = accesslog_pb2.HTTPAccessLogEntry()
    out.response.response_code.value = status
    out.common_properties.metadata.filter_metadata["gateway"].update({"model": model})
    if shed is not None:
        out.common_properties.metadata.filter_metadata[SHED_NAMESPACE].update({"priority": shed})
    out.common_properties.route_name = route
    return out


def test_counters_and_gauges() -> None:
    metrics = CollectorRegistry()
    counters = OverloadCounters(REGISTRY, metrics)
    assert counters.record(_entry("qwen", 503, shed="low")) == "shed"
    assert counters.record(_entry("qwen2", 503, shed="whatever")) == "shed"
    assert counters.record(_entry("qwen", route="fallback:qwen>small")) == "fallback"
    assert counters.record(_entry("qwen", route="fallback:qwen>gone")) == "fallback"
    assert counters.record(_entry("qwen", route="model:qwen")) is None
    value = metrics.get_sample_value
    assert value("llm_gateway_shed_requests_total", {"model": "qwen2", "priority": "low"}) == 1
    assert value("llm_gateway_shed_requests_total", {"model": "qwen2", "priority": "(other)"}) == 1
    assert value("llm_gateway_fallback_requests_total", {"model": "qwen2", "fallback": "small"}) == 1
    assert value("llm_gateway_fallback_requests_total", {"model": "qwen2", "fallback": "(other)"}) == 1

    state = _state({"qwen2": 1})
    metrics.register(SaturationGauges(lambda: state))
    assert value("llm_gateway_model_saturation", {"model": "qwen2"}) == 1
    assert value("llm_gateway_model_saturation", {"model": "small"}) == 0
    assert value("llm_gateway_model_fallback_active", {"model": "qwen2", "fallback": "small"}) == 1


def _reserved(auth_mode: str = "none", priority_header: bool = True) -> Any:
    registry = parse_registry(
        {
            "auth": {"mode": auth_mode},
            "overload": {"priority_header": priority_header},
            "models": [
                {
                    "id": "qwen2",
                    "aliases": ["qwen"],
                    "engine": "vllm",
                    "endpoints": [{"url": "http://127.0.0.1:1"}],
                    "limits": {"max_concurrent_requests": 16},
                    "overload": {"reserve_for_high": 4},
                }
            ],
        }
    )
    return build_state(registry, lambda host: host, StateInputs())


def test_a_reserve_lowers_default_and_adds_high_thresholds() -> None:
    cluster = build_snapshot(_reserved(), NodeParams()).resources[CLUSTER]["model_qwen2"]
    default, high = cluster.circuit_breakers.thresholds
    assert (
        default.priority == base_pb2.RoutingPriority.DEFAULT
        and high.priority == base_pb2.RoutingPriority.HIGH
    )
    assert (default.max_requests.value, default.max_connections.value) == (12, 12)
    assert (high.max_requests.value, high.max_connections.value) == (16, 16)
    plain = build_snapshot(_state(), NodeParams()).resources[CLUSTER]["model_qwen2"]
    assert len(plain.circuit_breakers.thresholds) == 1


def test_high_routes_come_first_matching_the_header_or_the_key() -> None:
    routes = list(_routes(_reserved()).values())
    names = [r.name for r in routes]
    assert names.index("high:qwen") + 1 == names.index("model:qwen")
    high = routes[names.index("high:qwen")]
    assert high.route.priority == base_pb2.RoutingPriority.HIGH
    assert [(h.name, h.string_match.exact) for h in high.match.headers] == [("x-gateway-priority", "high")]
    # With keys: the key's class in metadata, never the header; the model route asks for a re-route.
    keyed = _routes(_reserved("api_key"))
    assert not keyed["high:qwen2"].match.headers
    assert [s.key for s in keyed["high:qwen2"].match.dynamic_metadata[-1].path] == ["key", "priority"]
    assert _shed_data(keyed["model:qwen2"]) == {"reroute_high": True}
    assert not _shed_data(keyed["high:qwen2"]).get("reroute_high")
    # Without keys and without the header there is no way to say `high`: no extra routes.
    assert "high:qwen" not in _routes(_reserved(priority_header=False))


def test_a_reserve_that_leaves_nothing_is_refused() -> None:
    from control_plane.errors import ConfigError

    doc = {
        "models": [
            {
                "id": "m",
                "engine": "vllm",
                "endpoints": [{"url": "http://127.0.0.1:1"}],
                "limits": {"max_concurrent_requests": 4},
                "overload": {"reserve_for_high": 4},
            }
        ]
    }
    with pytest.raises(ConfigError, match=r"models\[0\]\.overload\.reserve_for_high: 4 leaves nothing"):
        parse_registry(doc)
