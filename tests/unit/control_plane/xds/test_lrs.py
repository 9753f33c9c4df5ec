"""Load reports (LRS): the store's arithmetic and freshness, and the gRPC servicer against a real client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc

from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.lrs import (
    EndpointSample,
    LoadReportingServicer,
    LoadReportStore,
    add_lrs_servicer,
    samples_from_cluster_stats,
)
from control_plane.xds.server import AdsServicer, create_grpc_server

pytestmark = pytest.mark.unit

A = "10.0.0.1:8000"
B = "10.0.0.2:8000"


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def sample(address: str, cluster: str = "model_a", **figures: int) -> EndpointSample:
    return EndpointSample(cluster=cluster, address=address, **figures)


def connected_store(*nodes: str, clock: FakeClock | None = None, **kwargs: float) -> LoadReportStore:
    store = LoadReportStore(clock=clock or FakeClock(), **kwargs)
    for node in nodes:
        store.node_connected(node)
    return store


# The store
def test_in_progress_is_the_latest_and_counters_accumulate() -> None:
    store = connected_store("e1")
    store.record("e1", [sample(A, in_progress=3, issued=3, successful=1, errors=1)])
    store.record("e1", [sample(A, in_progress=2, issued=4, successful=5)])
    assert store.in_flight(A) == 2
    assert store.issued_total(A) == 7
    assert store.successful_total(A) == 6
    assert store.error_total(A) == 1


def test_an_endpoint_absent_from_a_report_has_nothing_in_flight() -> None:
    store = connected_store("e1")
    store.record("e1", [sample(A, in_progress=3, issued=3), sample(B, in_progress=1, issued=1)])
    store.record("e1", [sample(B, in_progress=1)])
    assert store.in_flight(A) == 0
    assert store.in_flight(B) == 1
    assert store.issued_total(A) == 3  # counters survive the endpoint's absence
    store.record("e1", [])
    assert store.in_flight(B) == 0
    assert store.in_flight("10.9.9.9:1") == 0  # never reported at all
    assert store.in_flight_by_node("10.9.9.9:1") == {"e1": 0}


def test_clusters_and_localities_add_up_and_can_be_selected() -> None:
    store = connected_store("e1")
    store.record(
        "e1",
        [
            sample(A, cluster="model_a", in_progress=2, issued=2),
            sample(A, cluster="model_a", in_progress=1, issued=1),  # same host in another locality
            sample(A, cluster="model_b", in_progress=4, issued=4),
        ],
    )
    assert store.in_flight(A) == 7
    assert store.in_flight(A, cluster="model_a") == 3
    assert store.in_flight(A, cluster="model_b") == 4
    assert store.in_flight(A, cluster="model_c") == 0
    assert store.issued_total(A) == 7
    assert store.issued_total(A, cluster="model_b") == 4
    assert store.addresses() == {A}


def test_nodes_add_up_and_are_listed_per_node() -> None:
    store = connected_store("e1", "e2", "e3")
    store.record("e1", [sample(A, in_progress=2)])
    store.record("e2", [sample(A, in_progress=3), sample(B, in_progress=1)])
    assert store.in_flight(A) == 5
    assert store.in_flight_by_node(A) == {"e1": 2, "e2": 3}  # e3 has not reported: not fresh
    assert store.in_flight_by_node(B) == {"e1": 0, "e2": 1}
    assert store.fresh_nodes() == {"e1", "e2"}


def test_staleness_follows_the_clock() -> None:
    clock = FakeClock()
    store = connected_store("e1", "e2", clock=clock, interval_s=1.0)
    assert store.stale_after_s == 3.0
    assert store.last_report_age("e1") is None
    assert store.last_report_age("nobody") is None
    store.record("e1", [sample(A, in_progress=2)])
    clock.t += 2.0
    store.record("e2", [sample(A, in_progress=5)])
    assert store.last_report_age("e1") == pytest.approx(2.0)
    assert store.in_flight(A) == 7
    clock.t += 1.0  # e1's report is now 3 s old: stale
    assert store.fresh_nodes() == {"e2"}
    assert store.in_flight(A) == 5
    assert store.in_flight_by_node(A) == {"e2": 5}
    store.record("e1", [sample(A, in_progress=1)])
    assert store.in_flight(A) == 6
    assert LoadReportStore(interval_s=2.0, stale_after_s=10.0).stale_after_s == 10.0
    with pytest.raises(ValueError):
        LoadReportStore(interval_s=0)


def test_disconnect_forget_and_pruning() -> None:
    clock = FakeClock()
    store = connected_store("e1", "e2", clock=clock, forget_gone_after_s=60.0)
    store.node_connected("e1")  # a second stream of e1 (a reconnect overlapping the old one)
    store.record("e1", [sample(A, in_progress=2, issued=2)])
    store.record("e2", [sample(A, in_progress=3, issued=3)])
    store.node_disconnected("e1")
    assert store.in_flight(A) == 5  # e1 still has a stream
    store.node_disconnected("e1")
    assert store.fresh_nodes() == {"e2"}
    assert store.in_flight(A) == 3
    assert store.issued_total(A) == 5  # a gone node's counters are kept a while
    assert store.known_nodes() == {"e1", "e2"}
    store.node_connected("e1")  # back before being forgotten: fresh again at its next report
    assert store.fresh_nodes() == {"e2"}
    store.record("e1", [sample(A, in_progress=1, issued=1)])
    assert store.in_flight(A) == 4 and store.issued_total(A) == 6
    store.node_disconnected("e1")
    clock.t += 61.0
    store.record("e2", [sample(A, in_progress=0)])  # any change prunes nodes gone for too long
    assert store.known_nodes() == {"e2"}
    assert store.issued_total(A) == 3
    store.forget("e2")
    store.forget("never-seen")
    assert store.known_nodes() == set()
    assert store.in_flight(A) == 0 and store.issued_total(A) == 0
    store.node_disconnected("never-seen")  # harmless


def test_snapshot_is_plain_data() -> None:
    store = connected_store("e1")
    store.record("e1", [sample(A, in_progress=2, issued=3, successful=1)])
    snap = store.snapshot()
    assert snap["interval_s"] == 1.0
    nodes = snap["nodes"]
    assert isinstance(nodes, dict)
    assert nodes["e1"]["fresh"] is True
    assert nodes["e1"]["clusters"]["model_a"][A] == {
        "in_progress": 2,
        "issued_total": 3,
        "successful_total": 1,
        "error_total": 0,
    }
    endpoints = snap["endpoints"]
    assert isinstance(endpoints, dict)
    assert endpoints[A]["in_flight"] == 2 and endpoints[A]["in_flight_by_node"] == {"e1": 2}


def test_wait_for_report_waits_for_every_fresh_node() -> None:
    async def main() -> None:
        clock = FakeClock()
        store = connected_store("e1", "e2", clock=clock, interval_s=0.05, stale_after_s=1000.0)
        assert await store.wait_for_report(after=clock.t, timeout_s=0.01)  # no fresh node: nothing to wait
        store.record("e1", [sample(A, in_progress=1)])
        store.record("e2", [sample(A, in_progress=1)])
        pushed_at = store.now()
        clock.t += 1.0
        assert not await store.wait_for_report(after=pushed_at, timeout_s=0.1)  # nobody reported since

        waiter = asyncio.create_task(store.wait_for_report(after=pushed_at, timeout_s=5.0))
        await asyncio.sleep(0.02)
        store.record("e1", [])
        await asyncio.sleep(0.02)
        assert not waiter.done()  # e2 has not reported yet
        store.record("e2", [])
        assert await asyncio.wait_for(waiter, 1.0)

        # The drain condition: everyone reported since the push, and nothing in flight on A.
        store.record("e1", [sample(A, in_progress=2)])
        pushed_at = store.now()
        clock.t += 1.0
        drained = asyncio.create_task(
            store.wait_until(lambda: store.reported_since(pushed_at) and store.in_flight(A) == 0, 5.0)
        )
        store.record("e1", [sample(A, in_progress=1)])
        store.record("e2", [])
        await asyncio.sleep(0.02)
        assert not drained.done()
        store.record("e1", [])
        assert await asyncio.wait_for(drained, 1.0)

    asyncio.run(main())


def test_wait_sees_a_node_going_stale_without_any_event() -> None:
    async def main() -> None:
        clock = FakeClock()
        store = connected_store("e1", clock=clock, interval_s=0.02)
        store.record("e1", [])
        after = store.now()
        waiter = asyncio.create_task(store.wait_for_report(after=after, timeout_s=5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        clock.t += 10.0  # e1 is stale now: no fresh node is left to wait for
        assert await asyncio.wait_for(waiter, 1.0)

    asyncio.run(main())


# Parsing Envoy's messages
def endpoint_stats(host: str, port: int, **figures: int) -> load_report_pb2.UpstreamEndpointStats:
    address = address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))
    return load_report_pb2.UpstreamEndpointStats(
        address=address,
        total_requests_in_progress=figures.get("in_progress", 0),
        total_successful_requests=figures.get("successful", 0),
        total_error_requests=figures.get("errors", 0),
        total_issued_requests=figures.get("issued", 0),
    )


def cluster_stats(
    name: str, *endpoints: load_report_pb2.UpstreamEndpointStats
) -> load_report_pb2.ClusterStats:
    return load_report_pb2.ClusterStats(
        cluster_name=name,
        upstream_locality_stats=[load_report_pb2.UpstreamLocalityStats(upstream_endpoint_stats=endpoints)],
    )


def test_samples_from_cluster_stats() -> None:
    pipe = load_report_pb2.UpstreamEndpointStats(
        address=address_pb2.Address(pipe=address_pb2.Pipe(path="/run/sock")), total_requests_in_progress=1
    )
    internal = load_report_pb2.UpstreamEndpointStats(
        address=address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress()),
        total_requests_in_progress=9,
    )
    locality_only = load_report_pb2.ClusterStats(
        cluster_name="old",
        upstream_locality_stats=[load_report_pb2.UpstreamLocalityStats(total_requests_in_progress=4)],
    )
    samples = samples_from_cluster_stats(
        [
            cluster_stats(
                "model_a",
                endpoint_stats("10.0.0.1", 8000, in_progress=2, successful=3, errors=1, issued=4),
                pipe,
                internal,
            ),
            cluster_stats("model_b", endpoint_stats("::1", 9000, in_progress=1)),
            locality_only,
            load_report_pb2.ClusterStats(cluster_name="idle"),
        ]
    )
    assert samples == [
        EndpointSample("model_a", "10.0.0.1:8000", in_progress=2, successful=3, errors=1, issued=4),
        EndpointSample("model_a", "/run/sock", in_progress=1),
        EndpointSample("model_b", "::1:9000", in_progress=1),
    ]


# The servicer, through a real gRPC server and client
class LrsClient:
    """Speaks LRS as Envoy does: the node in every message, reports after the server's answer."""

    def __init__(self, address: str, node_id: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = lrs_pb2_grpc.LoadReportingServiceStub(self._channel)
        self._node = base_pb2.Node(id=node_id, cluster="test")
        self._outbox: asyncio.Queue[lrs_pb2.LoadStatsRequest | None] = asyncio.Queue()
        self.call: grpc.aio.StreamStreamCall | None = None

    async def _requests(self) -> AsyncIterator[lrs_pb2.LoadStatsRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    def start(self) -> None:
        self.call = self._stub.StreamLoadStats(self._requests())

    def send(self, *clusters: load_report_pb2.ClusterStats, node: bool = True) -> None:
        request = lrs_pb2.LoadStatsRequest(cluster_stats=clusters)
        if node:
            request.node.CopyFrom(self._node)
        self._outbox.put_nowait(request)

    async def receive(self) -> lrs_pb2.LoadStatsResponse:
        assert self.call is not None
        response = await asyncio.wait_for(self.call.read(), 5)
        assert isinstance(response, lrs_pb2.LoadStatsResponse)
        return response

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self.call is not None:
            with_status = await asyncio.wait_for(self.call.code(), 5)
            assert with_status == grpc.StatusCode.OK
        await self._channel.close()


def run(scenario: Callable[[LoadReportStore, str, list[str]], Awaitable[None]]) -> None:
    async def main() -> None:
        store = LoadReportStore(interval_s=0.5)
        reports: list[str] = []
        server, port = create_grpc_server_with_lrs(store, reports)
        await server.start()
        try:
            await asyncio.wait_for(scenario(store, f"127.0.0.1:{port}", reports), timeout=20)
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


def create_grpc_server_with_lrs(store: LoadReportStore, reports: list[str]) -> tuple[grpc.aio.Server, int]:
    metrics = ControlPlaneMetrics.create()
    doc = {"models": [{"id": "a", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:9000"}]}]}
    plane = ControlPlane(parse_registry(doc), cache=SnapshotCache(), metrics=metrics, resolver=lambda h: h)
    server, port = create_grpc_server(AdsServicer(plane.cache, plane, metrics), "127.0.0.1:0")
    add_lrs_servicer(server, LoadReportingServicer(store, on_report=reports.append))
    return server, port


async def until(check: Callable[[], bool], store: LoadReportStore) -> None:
    assert await store.wait_until(check, timeout_s=5.0)


def test_servicer_answers_then_records_reports_and_forgets_the_stream() -> None:
    async def scenario(store: LoadReportStore, address: str, reports: list[str]) -> None:
        client = LrsClient(address, "envoy-1")
        client.start()
        client.send()  # Envoy's first message: the node, no figures yet
        response = await client.receive()
        assert response.send_all_clusters is True
        assert response.report_endpoint_granularity is True
        assert response.load_reporting_interval.ToMilliseconds() == 500
        await until(lambda: "envoy-1" in store.known_nodes(), store)
        assert store.fresh_nodes() == set()  # connected, but no figures yet
        assert reports == []

        client.send(cluster_stats("model_a", endpoint_stats("10.0.0.1", 8000, in_progress=3, issued=3)))
        await until(lambda: store.in_flight(A) == 3, store)
        assert store.fresh_nodes() == {"envoy-1"}
        client.send(cluster_stats("model_a", endpoint_stats("10.0.0.1", 8000, successful=3)))
        await until(lambda: store.in_flight(A) == 0 and store.successful_total(A) == 3, store)
        assert store.issued_total(A) == 3
        assert reports == ["envoy-1", "envoy-1"]

        await client.close()
        await until(lambda: store.fresh_nodes() == set(), store)
        assert store.in_flight_by_node(A) == {}

    run(scenario)


def test_servicer_records_a_reconnecting_envoys_first_message() -> None:
    async def scenario(store: LoadReportStore, address: str, reports: list[str]) -> None:
        # After a control-plane restart Envoy's first message already carries a report.
        client = LrsClient(address, "envoy-1")
        client.start()
        client.send(cluster_stats("model_a", endpoint_stats("10.0.0.1", 8000, in_progress=2)))
        await client.receive()
        await until(lambda: store.in_flight(A) == 2, store)
        await client.close()

    run(scenario)


def test_servicer_survives_odd_input_and_refuses_a_stream_without_node() -> None:
    async def scenario(store: LoadReportStore, address: str, reports: list[str]) -> None:
        anonymous = LrsClient(address, "")
        anonymous.start()
        anonymous.send()
        assert anonymous.call is not None
        assert await asyncio.wait_for(anonymous.call.code(), 5) == grpc.StatusCode.INVALID_ARGUMENT

        client = LrsClient(address, "envoy-2")
        client.start()
        client.send()
        await client.receive()
        no_address = load_report_pb2.UpstreamEndpointStats(total_requests_in_progress=7)
        client.send(cluster_stats("model_a", no_address), node=False)  # later messages may omit the node
        client.send(load_report_pb2.ClusterStats(cluster_name="idle"))
        client.send(cluster_stats("model_a", endpoint_stats("10.0.0.1", 8000, in_progress=1)))
        await until(lambda: store.in_flight(A) == 1, store)
        assert reports == ["envoy-2"] * 3
        assert store.addresses() == {A}
        await client.close()

    run(scenario)
