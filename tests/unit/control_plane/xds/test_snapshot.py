"""Content-hash versions and the consistency check that gates every push."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from control_plane.config import parse_registry
from control_plane.errors import InconsistentSnapshotError
from control_plane.state import NodeParams, build_state
from control_plane.xds.builders import build_snapshot
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import ENDPOINT, LISTENER, ROUTE
from control_plane.xds.snapshot import Snapshot, content_version

pytestmark = pytest.mark.unit


def good() -> Snapshot:
    registry = parse_registry(
        {"models": [{"id": "m", "engine": "tgi", "endpoints": [{"url": "http://127.0.0.1:1"}]}]}
    )
    return build_snapshot(build_state(registry, lambda h: h), NodeParams())


def with_resources(base: Snapshot, type_url: str, resources: dict[str, object]) -> Snapshot:
    all_resources = {t: dict(r) for t, r in base.resources.items()}
    all_resources[type_url] = resources  # type: ignore[assignment]
    return Snapshot.create(all_resources)  # type: ignore[arg-type]


def test_a_built_snapshot_is_consistent() -> None:
    assert good().consistency_problems() == []


def test_cluster_without_endpoints_is_inconsistent() -> None:
    snapshot = with_resources(good(), ENDPOINT, {})
    assert snapshot.consistency_problems() == ["cluster 'model_m' has no endpoint assignment 'model_m'"]


def test_orphan_assignment_is_inconsistent() -> None:
    base = good()
    extra = dict(base.resources[ENDPOINT]) | {
        "ghost": endpoint_pb2.ClusterLoadAssignment(cluster_name="ghost")
    }
    assert with_resources(base, ENDPOINT, extra).consistency_problems() == [
        "endpoint assignment 'ghost' belongs to no cluster"
    ]


def test_route_to_unknown_cluster_is_inconsistent() -> None:
    base = good()
    route_config = route_pb2.RouteConfiguration()
    route_config.CopyFrom(base.resources[ROUTE]["gateway"])
    route_config.virtual_hosts[0].routes.append(
        route_components_pb2.Route(
            name="bad",
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster="nope"),
        )
    )
    problems = with_resources(base, ROUTE, {"gateway": route_config}).consistency_problems()
    assert problems == ["route 'bad' of 'gateway' targets unknown cluster 'nope'"]


def test_listener_without_its_routes_is_inconsistent() -> None:
    problems = with_resources(good(), ROUTE, {}).consistency_problems()
    assert problems == ["listener 'gateway' needs route configuration 'gateway'"]


def test_content_version_is_a_hash_of_content() -> None:
    a = {"x": cluster_pb2.Cluster(name="x")}
    assert content_version(a) == content_version({"x": cluster_pb2.Cluster(name="x")})
    assert content_version(a) != content_version(
        {"x": cluster_pb2.Cluster(name="x", connect_timeout={"seconds": 1})}
    )
    assert content_version(a) != content_version({"y": cluster_pb2.Cluster(name="x")})


def test_cache_refuses_inconsistent_snapshots_and_keeps_the_last_good_one() -> None:
    cache = SnapshotCache()
    first = good()
    assert cache.set_snapshot("n", first)
    with pytest.raises(InconsistentSnapshotError):
        cache.set_snapshot("n", with_resources(first, ENDPOINT, {}))
    assert cache.get_snapshot("n") is first


def test_cache_notifies_only_on_change() -> None:
    cache = SnapshotCache()
    calls: list[str] = []
    with cache.watch("n", lambda: calls.append("changed")):
        assert cache.set_snapshot("n", good())
        assert not cache.set_snapshot("n", good())  # same content, same version: no push
        listeners = dict(good().resources[LISTENER])
        assert cache.set_snapshot("other", good())  # another node's watchers only
    assert calls == ["changed"]
    assert listeners
