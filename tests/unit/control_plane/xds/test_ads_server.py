"""The ADS transport against a client that speaks the protocol as Envoy does: initial fetch, ACK, NACK,
stale nonces, the post-CDS EDS re-request, several nodes, pushes only on change."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from control_plane.xds.server import AdsServicer, create_grpc_server
from tests.support.ads_client import AdsClient

pytestmark = pytest.mark.unit


def registry(*model_ids: str, port: int = 9000) -> Any:
    return parse_registry(
        {
            "models": [
                {"id": m, "engine": "vllm", "endpoints": [{"url": f"http://127.0.0.1:{port}"}]}
                for m in model_ids
            ]
        }
    )


Scenario = Callable[[ControlPlane, ControlPlaneMetrics, str], Awaitable[None]]


def run(scenario: Scenario) -> None:
    async def main() -> None:
        metrics = ControlPlaneMetrics.create()
        # The scenarios answer by hand after each change: the plane must not wait for their ACKs (its
        # verdict wait is tested in test_sync.py).
        plane = ControlPlane(
            registry("a"), cache=SnapshotCache(), metrics=metrics, resolver=lambda h: h, sync_timeout_s=0.01
        )
        server, port = create_grpc_server(AdsServicer(plane.cache, plane, metrics), "127.0.0.1:0")
        await server.start()
        try:
            await asyncio.wait_for(scenario(plane, metrics, f"127.0.0.1:{port}"), timeout=20)
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


def value(metrics: ControlPlaneMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def subscribe_all(client: AdsClient) -> dict[str, Any]:
    """Do what Envoy does at start: CDS, then EDS for the clusters, LDS, then RDS; ACK each."""
    await client.start()
    client.send(CLUSTER)
    cds = await client.receive()
    clusters = [_unpack(r, cluster_pb2.Cluster).name for r in cds.resources]
    client.ack(cds)
    client.send(ENDPOINT, names=clusters)
    eds = await client.receive()
    client.ack(eds, names=clusters)
    client.send(LISTENER)
    lds = await client.receive()
    client.ack(lds)
    client.send(ROUTE, names=["gateway"])
    rds = await client.receive()
    client.ack(rds, names=["gateway"])
    await client.expect_silence(0.3)
    return {"cds": cds, "eds": eds, "lds": lds, "rds": rds, "clusters": clusters}


def _unpack(any_msg: Any, cls: Any) -> Any:
    out = cls()
    any_msg.Unpack(out)
    return out


def test_initial_fetch_and_acks_then_silence() -> None:
    async def scenario(plane: ControlPlane, metrics: ControlPlaneMetrics, address: str) -> None:
        client = AdsClient(address, "envoy-1")
        got = await subscribe_all(client)
        assert got["clusters"] == ["model_a"]
        assert got["cds"].version_info == plane.cache.get_snapshot("envoy-1").versions[CLUSTER]  # type: ignore[union-attr]
        assert value(metrics, "llm_gateway_xds_connected_envoys") == 1
        assert value(metrics, "llm_gateway_xds_pushes_total", type="cds") == 1
        await client.close()

    run(scenario)


def test_change_is_pushed_in_order_and_only_changed_types() -> None:
    async def scenario(plane: ControlPlane, metrics: ControlPlaneMetrics, address: str) -> None:
        client = AdsClient(address, "envoy-1")
        got = await subscribe_all(client)
        await plane.apply_registry(registry("a", port=9001))  # endpoint port only: EDS alone changes
        eds = await client.receive()
        assert eds.type_url == ENDPOINT and eds.version_info != got["eds"].version_info
        assignment = _unpack(eds.resources[0], endpoint_pb2.ClusterLoadAssignment)
        assert assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 9001
        client.ack(eds, names=got["clusters"])
        await client.expect_silence(0.3)

        await plane.apply_registry(registry("a", "b", port=9001))  # a new model: CDS, then RDS
        cds = await client.receive()
        assert cds.type_url == CLUSTER and len(cds.resources) == 2
        client.ack(cds)
        # Like Envoy, re-request EDS for the new cluster set with the old nonce (stale but must be served).
        client.send(ENDPOINT, version=eds.version_info, nonce=eds.nonce, names=["model_a", "model_b"])
        seen = {}
        for _ in range(2):
            response = await client.receive()
            seen[response.type_url] = response
            client.ack(
                response, names=["model_a", "model_b"] if response.type_url == ENDPOINT else ["gateway"]
            )
        assert set(seen) == {ENDPOINT, ROUTE}
        assert {
            _unpack(r, endpoint_pb2.ClusterLoadAssignment).cluster_name for r in seen[ENDPOINT].resources
        } == {"model_a", "model_b"}
        await client.expect_silence(0.3)
        await client.close()

    run(scenario)


def test_eds_request_after_a_cds_push_is_answered_even_if_it_looks_like_an_ack() -> None:
    async def scenario(plane: ControlPlane, metrics: ControlPlaneMetrics, address: str) -> None:
        client = AdsClient(address, "envoy-1")
        got = await subscribe_all(client)
        doc = {
            "models": [
                {
                    "id": "a",
                    "engine": "vllm",
                    "endpoints": [{"url": "http://127.0.0.1:9000"}],
                    "limits": {"connect_timeout_s": 5},
                }
            ]
        }
        await plane.apply_registry(parse_registry(doc))  # the cluster changes, its endpoints do not
        cds = await client.receive()
        client.ack(cds)
        # Envoy re-requests EDS with the same version and nonce: looks like an ACK, must be answered.
        client.send(ENDPOINT, version=got["eds"].version_info, nonce=got["eds"].nonce, names=got["clusters"])
        eds = await client.receive()
        assert eds.type_url == ENDPOINT and eds.version_info == got["eds"].version_info
        client.ack(eds, names=got["clusters"])
        await client.expect_silence(0.3)
        await client.close()

    run(scenario)


async def ack_all(client: AdsClient, seconds: float, names: dict[str, list[str]]) -> list[str]:
    """ACK whatever arrives for a while, like Envoy would; return the types received."""
    received = []
    while True:
        try:
            response = await client.receive(timeout_s=seconds)
        except TimeoutError:
            return received
        received.append(response.type_url)
        client.ack(response, names=names.get(response.type_url))


def test_nack_is_counted_and_not_repushed_until_the_content_changes() -> None:
    async def scenario(plane: ControlPlane, metrics: ControlPlaneMetrics, address: str) -> None:
        client = AdsClient(address, "envoy-1")
        got = await subscribe_all(client)
        names = {ENDPOINT: got["clusters"], ROUTE: ["gateway"]}
        await plane.apply_registry(registry("a", "b"))
        cds = await client.receive()
        assert cds.type_url == CLUSTER
        client.send(CLUSTER, version=got["cds"].version_info, nonce=cds.nonce, error="rejected for the test")
        # Other types may still arrive; the rejected CDS must not come back.
        assert CLUSTER not in await ack_all(client, 3.0, names)
        assert value(metrics, "llm_gateway_xds_nacks_total", type="cds") == 1
        await plane.apply_registry(registry("a", "b"))  # same content: still nothing
        await client.expect_silence(0.3)
        await plane.apply_registry(registry("a", "c"))  # new content: pushed
        again = await client.receive()
        while again.type_url != CLUSTER:
            again = await client.receive()
        assert again.version_info not in (cds.version_info, got["cds"].version_info)
        await client.close()

    run(scenario)


def test_stale_nonces_are_ignored() -> None:
    async def scenario(plane: ControlPlane, metrics: ControlPlaneMetrics, address: str) -> None:
        client = AdsClient(address, "envoy-1")
        await subscribe_all(client)
        client.send(LISTENER, version="old", nonce="12345")
        await client.expect_silence(0.3)
        await client.close()

    run(scenario)


def test_several_nodes_with_their_own_listen_ports() -> None:
    async def scenario(plane: ControlPlane, metrics: ControlPlaneMetrics, address: str) -> None:
        from envoy.config.listener.v3 import listener_pb2

        clients = [AdsClient(address, f"envoy-{i}", {"listen_port": str(10000 + i)}) for i in range(3)]
        ports = []
        for client in clients:
            got = await subscribe_all(client)
            ports.append(
                _unpack(got["lds"].resources[0], listener_pb2.Listener).address.socket_address.port_value
            )
        assert ports == [10000, 10001, 10002]
        assert value(metrics, "llm_gateway_xds_connected_envoys") == 3
        await plane.apply_registry(registry("a", "b"))
        for client in clients:
            assert (await client.receive()).type_url == CLUSTER
        for client in clients:
            await client.close()
        await asyncio.sleep(0.2)
        assert value(metrics, "llm_gateway_xds_connected_envoys") == 0

    run(scenario)


def test_a_reconnecting_client_gets_everything_again() -> None:
    async def scenario(plane: ControlPlane, metrics: ControlPlaneMetrics, address: str) -> None:
        first = AdsClient(address, "envoy-1")
        got = await subscribe_all(first)
        await first.close()
        second = AdsClient(address, "envoy-1")
        await second.start()
        # A reconnecting Envoy sends the version it has and no nonce: it must still be answered.
        second.send(CLUSTER, version=got["cds"].version_info)
        response = await second.receive()
        assert response.type_url == CLUSTER and response.version_info == got["cds"].version_info
        await second.close()

    run(scenario)
