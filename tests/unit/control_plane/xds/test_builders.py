"""The builders against golden files of the rendered Envoy resources, plus the properties that matter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from google.protobuf import json_format

from control_plane.config import parse_registry
from control_plane.state import GatewayState, Health, NodeParams, StateInputs, build_state
from control_plane.xds.builders import build_snapshot
from control_plane.xds.builders.route import models_list_body
from control_plane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, cluster_name

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parents[3] / "golden" / "xds"

REGISTRY = {
    "gateway": {"expose_upstream_host": True, "max_request_body_bytes": 65536},
    "models": [
        {
            "id": "qwen2",
            "aliases": ["qwen"],
            "engine": "tgi",
            "endpoints": [
                {"id": "q0", "url": "http://127.0.0.1:8101", "weight": 3},
                {"id": "q1", "url": "http://127.0.0.1:8102"},
            ],
            "limits": {
                "max_concurrent_requests": 8,
                "max_pending_requests": 4,
                "request_timeout_s": 30,
                "idle_timeout_s": 5,
            },
            "retry": {"attempts": 1},
        },
        {
            "id": "meta-llama/Llama-3.1-8B",
            "engine": "vllm",
            "enabled": False,
            "endpoints": [{"url": "http://127.0.0.1:8201"}],
        },
    ],
}


def fake_resolver(host: str) -> str:
    return {"localhost": "127.0.0.1"}.get(host, host)


def state(inputs: StateInputs | None = None) -> GatewayState:
    return build_state(parse_registry(REGISTRY), fake_resolver, inputs)


def rendered(type_url: str, node: NodeParams | None = None) -> dict[str, object]:
    snapshot = build_snapshot(state(), node or NodeParams())
    return {
        name: json_format.MessageToDict(msg) for name, msg in sorted(snapshot.resources[type_url].items())
    }


@pytest.mark.parametrize(
    ("type_url", "golden"),
    [
        (CLUSTER, "clusters.json"),
        (ENDPOINT, "endpoints.json"),
        (LISTENER, "listeners.json"),
        (ROUTE, "routes.json"),
    ],
)
def test_rendered_resources_match_golden_files(type_url: str, golden: str) -> None:
    actual = json.dumps(rendered(type_url), indent=2, sort_keys=True) + "\n"
    path = GOLDEN / golden
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(actual)
    assert path.read_text() == actual, (
        f"{golden} differs; rerun with UPDATE_GOLDEN=1 if the change is intended"
    )


def test_cluster_names_are_stat_safe_and_unique() -> None:
    assert cluster_name("qwen2") == "model_qwen2"
    odd = cluster_name("meta-llama/Llama-3.1-8B")
    assert "." not in odd and "/" not in odd
    assert cluster_name("a.b") != cluster_name("a_b")


def test_builders_are_deterministic() -> None:
    assert build_snapshot(state(), NodeParams()).version == build_snapshot(state(), NodeParams()).version


def test_versions_change_only_for_the_types_that_changed() -> None:
    before = build_snapshot(state(), NodeParams())
    after = build_snapshot(state(StateInputs(health={"q1": Health.DRAINING})), NodeParams())
    changed = {t for t in before.versions if before.versions[t] != after.versions[t]}
    assert changed == {ENDPOINT}


def test_live_health_and_weight_reach_eds() -> None:
    snapshot = build_snapshot(
        state(StateInputs(health={"q0": Health.UNHEALTHY}, weights={"q1": 7})), NodeParams()
    )
    assignment = snapshot.resources[ENDPOINT]["model_qwen2"]
    by_id = {e.endpoint.hostname: e for e in assignment.endpoints[0].lb_endpoints}  # type: ignore[attr-defined]
    assert by_id["q0"].health_status == health_check_pb2.HealthStatus.UNHEALTHY
    assert by_id["q0"].load_balancing_weight.value == 3
    assert by_id["q1"].load_balancing_weight.value == 7


def test_node_metadata_overrides_the_listen_port() -> None:
    listeners = rendered(LISTENER, NodeParams(listen_address="0.0.0.0", listen_port=9999))
    address = listeners["gateway"]["address"]["socketAddress"]  # type: ignore[index]
    assert address == {"address": "0.0.0.0", "portValue": 9999}


def test_models_list_has_only_enabled_models() -> None:
    body = json.loads(models_list_body(state()))
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["qwen2"]


def test_cluster_overrides_are_merged() -> None:
    doc = json.loads(json.dumps(REGISTRY))
    doc["models"][0]["cluster_overrides"] = {
        "lb_policy": "ROUND_ROBIN",
        "per_connection_buffer_limit_bytes": 1234,
    }
    snapshot = build_snapshot(build_state(parse_registry(doc), fake_resolver), NodeParams())
    cluster = snapshot.resources[CLUSTER]["model_qwen2"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert cluster.lb_policy == cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN
    assert cluster.per_connection_buffer_limit_bytes.value == 1234
    assert cluster.circuit_breakers.thresholds[0].max_requests.value == 8  # the rest stays


def test_unresolvable_endpoints_are_left_out() -> None:
    def resolver(host: str) -> str:
        from control_plane.errors import ResolutionError

        raise ResolutionError(host)

    doc = {"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "http://nowhere.invalid:1"}]}]}
    assert build_state(parse_registry(doc), resolver).models[0].endpoints == ()
