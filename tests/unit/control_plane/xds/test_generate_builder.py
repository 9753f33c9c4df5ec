"""The /v1/generate builder: per-route data, where it goes, and the scenario registry it comes from."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2 as j2m
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import json_format

from control_plane.config import parse_registry
from control_plane.config.scenarios import DEFAULT_SCENARIOS
from control_plane.errors import ConfigError
from control_plane.state import NodeParams, build_state
from control_plane.xds.builders.generate import LUA_FILTER_NAME, RENAME_FILTER_NAME, lua_source, route_data
from control_plane.xds.builders.listener import build_listener
from control_plane.xds.builders.prefix_affinity import PREFIX_FILTER_NAME
from control_plane.xds.builders.route import build_route_configuration

pytestmark = pytest.mark.unit


def _registry(**extra: Any) -> dict[str, Any]:
    return {
        "models": [
            {
                "id": "qwen2",
                "aliases": ["qwen"],
                "engine": "tgi",
                "endpoints": [{"url": "http://127.0.0.1:8101"}],
                "served_model": "Qwen2-7B-Instruct-GPTQ-Int4",
                "scenarios": {"qa": {"system": "Answer in one line.", "user": "Q: {inputs}"}},
            },
            {"id": "llama3", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:8201"}]},
            {
                "id": "off",
                "engine": "vllm",
                "enabled": False,
                "endpoints": [{"url": "http://127.0.0.1:8301"}],
            },
        ],
        **extra,
    }


def test_route_data_layers_defaults_registry_and_model_scenarios() -> None:
    registry = parse_registry(_registry(scenarios={"poem": {"user": "A poem about {inputs}"}}))
    qwen, llama, _ = registry.models
    data = route_data(qwen)
    assert data["id"] == "qwen2" and data["engine"] == "tgi"
    assert data["served_model"] == "Qwen2-7B-Instruct-GPTQ-Int4"
    assert sorted(data["scenarios"]) == ["poem", "qa", "rewrite", "summarize"]
    assert data["scenarios"]["qa"] == {"system": "Answer in one line.", "user": "Q: {inputs}"}
    llama_data = route_data(llama)
    assert "served_model" not in llama_data
    assert llama_data["scenarios"]["qa"]["user"] == DEFAULT_SCENARIOS["qa"].user
    assert llama_data["scenarios"]["poem"] == {"user": "A poem about {inputs}"}


def test_model_routes_carry_the_data_and_direct_replies_do_not() -> None:
    state = build_state(parse_registry(_registry()), lambda host: host)
    routes = build_route_configuration(state).virtual_hosts[0].routes
    by_name: dict[str, rc.Route] = {r.name: r for r in routes}
    for name in ("model:qwen2", "model:qwen"):
        meta = json_format.MessageToDict(by_name[name].metadata.filter_metadata[LUA_FILTER_NAME])
        assert meta["id"] == "qwen2" and meta["served_model"] == "Qwen2-7B-Instruct-GPTQ-Int4"
        # Only a model with served_model has the rename filter entered on its routes.
        assert RENAME_FILTER_NAME in by_name[name].typed_per_filter_config
        assert by_name[name].metadata.filter_metadata[RENAME_FILTER_NAME]["served_model"] == (
            "Qwen2-7B-Instruct-GPTQ-Int4"
        )
    other = [r for n, r in by_name.items() if n.startswith("model:") and not n.startswith("model:qwen")]
    assert other and all(RENAME_FILTER_NAME not in r.typed_per_filter_config for r in other)
    assert LUA_FILTER_NAME not in by_name["disabled:off"].metadata.filter_metadata
    assert LUA_FILTER_NAME not in by_name["unknown-model"].metadata.filter_metadata


def test_listener_reads_model_id_and_runs_lua_before_the_router() -> None:
    state = build_state(parse_registry(_registry()), lambda host: host)
    listener = build_listener(state.settings, NodeParams())
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    names = [f.name for f in manager.http_filters]
    assert names.index("envoy.filters.http.json_to_metadata") < names.index(LUA_FILTER_NAME)
    # Then the prefix-affinity key filter (entered only on prefix-affine models' routes), then the router.
    assert names[-4:] == [
        LUA_FILTER_NAME,
        RENAME_FILTER_NAME,
        PREFIX_FILTER_NAME,
        "envoy.filters.http.router",
    ]
    # The generate filter is skipped by a matcher unless the path is /v1/generate.
    generate = manager.http_filters[names.index(LUA_FILTER_NAME)].typed_config
    assert generate.type_url.endswith("ExtensionWithMatcher") and b"/v1/generate" in generate.value
    body_rules = j2m.JsonToMetadata()
    manager.http_filters[names.index("envoy.filters.http.json_to_metadata")].typed_config.Unpack(body_rules)
    keys = [rule.selectors[0].key for rule in body_rules.request_rules.rules]
    # `model_id` first, so a body's `model` (applied after it) wins when both are given.
    assert keys.index("model_id") < keys.index("model")
    assert "function envoy_on_request" in lua_source() and "function envoy_on_response" in lua_source()


@pytest.mark.parametrize(
    ("scenarios", "where"),
    [
        ({"qa": {"user": "no placeholder"}}, "scenarios.qa.user"),
        ({"Bad Name": {"user": "{inputs}"}}, "scenarios"),
        ({"qa": {"user": "{inputs}", "sistem": "typo"}}, "scenarios.qa.sistem"),
        ({"qa": {"system": "bell\x07", "user": "{inputs}"}}, "scenarios.qa.system"),
    ],
)
def test_bad_scenarios_are_refused_at_load_naming_the_path(scenarios: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_registry(_registry(scenarios=scenarios))
    assert where in str(caught.value)
    doc = _registry()
    doc["models"][1]["scenarios"] = scenarios
    with pytest.raises(ConfigError) as caught:
        parse_registry(doc)
    assert f"models[1].{where}" in str(caught.value)
