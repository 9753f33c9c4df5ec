"""The API-key check as built for Envoy: a table of hashes (ids for aliases, nothing for unknown names),
the filters in their order only with keys on, the model id on model routes, /health open."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from control_plane.config import parse_registry
from control_plane.state import KeyEntry, NodeParams, StateInputs, build_state
from control_plane.xds.builders import build_snapshot
from control_plane.xds.builders.keys import KEY_FILTER_NAME, build_key_extension, key_data
from control_plane.xds.resources import EXTENSION_CONFIG, LISTENER, ROUTE

pytestmark = pytest.mark.unit

KEY = KeyEntry(sha256="ab" * 32, id="key_1", name="team-a", models=("qwen", "gone"), rpm_limit=60)


def _state(mode: str = "api_key", keys: tuple[KeyEntry, ...] = (KEY,)) -> Any:
    registry = parse_registry(
        {
            "auth": {"mode": mode},
            "models": [
                {
                    "id": "qwen2",
                    "aliases": ["qwen"],
                    "engine": "tgi",
                    "endpoints": [{"url": "http://127.0.0.1:1"}],
                },
                {"id": "llama3", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:2"}]},
            ],
        }
    )
    return build_state(registry, lambda host: host, StateInputs(keys=keys))


def _filters(snapshot: Any) -> list[str]:
    listener = next(iter(snapshot.resources[LISTENER].values()))
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    return [f.name for f in manager.http_filters]


def test_the_table_holds_hashes_and_model_ids() -> None:
    data = key_data(_state())
    fields = data.rstrip("\n").split("\t")
    # An alias resolves to its id; a name no model has allows nothing; limits ride along.
    assert fields[:5] == ["ab" * 32, "key_1", "team-a", "default", ",qwen2,"]
    assert fields[-2:] == ["60", "0"]
    every = key_data(_state(keys=(KeyEntry(sha256="cd" * 32, id="key_2", name="all"),)))
    assert every.split("\t")[4] == "*"
    lua = build_key_extension(_state())
    assert lua.name == KEY_FILTER_NAME and b"ab" * 32 in lua.typed_config.value


def test_a_field_that_would_break_the_data_is_refused() -> None:
    bad = KeyEntry(sha256="ab" * 32, id="key\t1", name="x")
    with pytest.raises(ValueError, match="key"):
        key_data(_state(keys=(bad,)))


def test_filters_and_routes_only_with_keys_on() -> None:
    on = build_snapshot(_state(), NodeParams(log_credential="c"))
    names = _filters(on)
    assert names.index("envoy.filters.http.json_to_metadata") < names.index(KEY_FILTER_NAME)
    assert names.index(KEY_FILTER_NAME) < names.index("gateway.quota") < names.index("envoy.filters.http.lua")
    assert names[-2:] == ["envoy.filters.http.ai_protocol_manager", "envoy.filters.http.router"]
    assert set(on.resources[EXTENSION_CONFIG]) == {KEY_FILTER_NAME}
    assert on.consistency_problems() == []
    routes = next(iter(on.resources[ROUTE].values())).virtual_hosts[0].routes
    model_route = next(r for r in routes if r.name == "model:qwen")
    assert model_route.metadata.filter_metadata[KEY_FILTER_NAME].fields["model"].string_value == "qwen2"
    health = next(r for r in routes if r.name == "health")
    assert KEY_FILTER_NAME in health.typed_per_filter_config

    off = build_snapshot(_state("none"), NodeParams())
    assert KEY_FILTER_NAME not in _filters(off) and "gateway.quota" not in _filters(off)
    assert not off.resources[EXTENSION_CONFIG]
    routes = next(iter(off.resources[ROUTE].values())).virtual_hosts[0].routes
    assert all(KEY_FILTER_NAME not in r.metadata.filter_metadata for r in routes)


def test_a_listener_naming_a_missing_filter_config_is_inconsistent() -> None:
    on = build_snapshot(_state(), NodeParams())
    broken = on.replacing(EXTENSION_CONFIG, {})
    assert any("ECDS" in problem for problem in broken.consistency_problems())
