"""The prefix-affinity builders: Maglev with bounded load on the cluster, a hash policy and the key filter on
the routes of prefix-affine models only, the filter in the listener without default code."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2

from control_plane.config import parse_registry
from control_plane.errors import ConfigError
from control_plane.state import NodeParams, build_state
from control_plane.xds.builders.cluster import build_cluster
from control_plane.xds.builders.generate import RENAME_FILTER_NAME
from control_plane.xds.builders.listener import build_listener
from control_plane.xds.builders.prefix_affinity import KEY_HEADER, PREFIX_FILTER_NAME
from control_plane.xds.builders.route import build_route_configuration
from control_plane.xds.envoy_check import cluster_problem

pytestmark = pytest.mark.unit


def _state(**extra: Any) -> Any:
    doc = {
        "models": [
            {
                "id": "chat",
                "aliases": ["chat-alias"],
                "engine": "vllm",
                "load_balancing": "prefix_affinity",
                "endpoints": [{"url": "http://127.0.0.1:8101"}, {"url": "http://127.0.0.1:8102"}],
                **extra,
            },
            {"id": "other", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:8201"}]},
        ]
    }
    return build_state(parse_registry(doc), lambda host: host)


def test_cluster_uses_maglev_with_bounded_load_on_endpoint_ids() -> None:
    chat, other = _state().models
    cluster = build_cluster(chat)
    (policy,) = cluster.load_balancing_policy.policies
    assert policy.typed_extension_config.name == "envoy.load_balancing_policies.maglev"
    maglev = maglev_pb2.Maglev()
    assert policy.typed_extension_config.typed_config.Unpack(maglev)
    assert maglev.consistent_hashing_lb_config.hash_balance_factor.value == 115  # the default bound
    assert maglev.consistent_hashing_lb_config.use_hostname_for_hashing
    (tighter,) = build_cluster(_state(prefix_load_bound_percent=110).models[0]).load_balancing_policy.policies
    assert tighter.typed_extension_config.typed_config.Unpack(maglev)
    assert maglev.consistent_hashing_lb_config.hash_balance_factor.value == 110
    (plain,) = build_cluster(other).load_balancing_policy.policies
    assert plain.typed_extension_config.name == "envoy.load_balancing_policies.least_request"


def test_envoy_accepts_the_cluster() -> None:
    problem = cluster_problem(build_cluster(_state().models[0]))
    assert problem is None, problem


def _model_routes(state: Any) -> dict[str, rc.Route]:
    config = build_route_configuration(state)
    return {r.name: r for r in config.virtual_hosts[0].routes if r.name.startswith("model:")}


def test_routes_of_prefix_affine_models_hash_the_key_and_enter_the_filter() -> None:
    routes = _model_routes(_state(served_model="engine-name"))
    for name in ("model:chat", "model:chat-alias"):
        route = routes[name]
        (policy,) = route.route.hash_policy
        assert policy.header.header_name == KEY_HEADER
        per_route = lua_pb2.LuaPerRoute()
        assert route.typed_per_filter_config[PREFIX_FILTER_NAME].Unpack(per_route) and per_route.name
        assert RENAME_FILTER_NAME in route.typed_per_filter_config  # served_model's filter still there
    other = routes["model:other"]
    assert not other.route.hash_policy and PREFIX_FILTER_NAME not in other.typed_per_filter_config


def test_listener_has_the_key_filter_after_rename_without_default_code() -> None:
    listener = build_listener(_state().settings, NodeParams())
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    names = [f.name for f in manager.http_filters]
    assert (
        names.index(RENAME_FILTER_NAME)
        < names.index(PREFIX_FILTER_NAME)
        < names.index("envoy.filters.http.router")
    )
    lua = lua_pb2.Lua()
    manager.http_filters[names.index(PREFIX_FILTER_NAME)].typed_config.Unpack(lua)
    # No default code: Envoy runs no coroutine for the routes that do not name its code.
    assert not lua.HasField("default_source_code") and set(lua.source_codes) == {"prefix"}


def test_unknown_policy_and_bad_bound_are_refused_with_their_path() -> None:
    with pytest.raises(ConfigError, match="load_balancing"):
        parse_registry({"models": [{"id": "m", "engine": "vllm", "load_balancing": "prefix"}]})
    with pytest.raises(ConfigError, match="prefix_load_bound_percent"):
        parse_registry({"models": [{"id": "m", "engine": "vllm", "prefix_load_bound_percent": 99}]})
