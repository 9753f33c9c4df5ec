"""ControlPlane: Envoys with the same settings share one snapshot; health flips change only EDS."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.state import Health
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE

pytestmark = pytest.mark.unit


def plane() -> ControlPlane:
    registry = parse_registry(
        {
            "models": [
                {
                    "id": "m",
                    "engine": "vllm",
                    "endpoints": [{"url": "http://127.0.0.1:1"}, {"url": "http://127.0.0.1:2"}],
                }
            ]
        }
    )
    return ControlPlane(
        registry,
        cache=SnapshotCache(),
        metrics=ControlPlaneMetrics.create(),
        resolver=lambda h: h,
        log_credential="xds1.log-credential",  # one for all nodes: it must not split their snapshots
    )


def node(node_id: str, listen_port: str | None = None) -> base_pb2.Node:
    out = base_pb2.Node(id=node_id)
    if listen_port:
        meta = struct_pb2.Struct()
        meta.update({"listen_port": listen_port})
        out.metadata.CopyFrom(meta)
    return out


def test_same_settings_share_one_snapshot_and_keep_sharing_after_a_flip() -> None:
    cp = plane()
    for name in ("a", "b"):
        cp.node_connected(node(name))
    cp.node_connected(node("c", listen_port="9999"))
    assert cp.cache.get_snapshot("a") is cp.cache.get_snapshot("b")
    assert cp.cache.get_snapshot("c") is not cp.cache.get_snapshot("a")
    shared = cp.cache.get_snapshot("a")
    assert shared is not None
    assert b"xds1.log-credential" in next(iter(shared.packed(LISTENER).values())).value

    before = cp.cache.get_snapshot("a")
    assert before is not None
    cp.set_health("m-1", Health.UNHEALTHY)
    after, other = cp.cache.get_snapshot("a"), cp.cache.get_snapshot("c")
    assert after is cp.cache.get_snapshot("b") and after is not before
    assert after is not None and other is not None
    # Only the endpoint assignments changed, for every node.
    assert {t for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE) if after.versions[t] != before.versions[t]} == {
        ENDPOINT
    }
    assert after.versions[ENDPOINT] == other.versions[ENDPOINT]
    assert after.consistency_problems() == []
