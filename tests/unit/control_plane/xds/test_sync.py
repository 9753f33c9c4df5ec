"""Admin changes wait for the connected Envoys' verdict: a NACK rolls the change back (nothing stored,
the previous config pushed again) and never blocks the next valid change; a node that does not answer
is reported as lagging and is not waited for again; with no Envoy connected the report says so."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from control_plane.admin.operations import AdminOperations
from control_plane.config import ModelConfig, parse_registry
from control_plane.errors import RejectedChangeError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from control_plane.xds.server import AdsServicer, create_grpc_server
from control_plane.xds.sync import NO_ENVOY
from tests.support.ads_client import AdsClient

pytestmark = pytest.mark.unit

Scenario = Callable[[ControlPlane, AdminOperations, str], Awaitable[None]]


def run(scenario: Scenario, sync_timeout_s: float = 10.0) -> None:
    async def main() -> None:
        metrics = ControlPlaneMetrics.create()
        registry = parse_registry(
            {"models": [{"id": "a", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:9000"}]}]}
        )
        plane = ControlPlane(
            registry,
            cache=SnapshotCache(),
            metrics=metrics,
            resolver=lambda h: h,
            sync_timeout_s=sync_timeout_s,
            cluster_checker=lambda clusters: {},  # Envoy's validate mode is tested elsewhere
        )
        server, port = create_grpc_server(AdsServicer(plane.cache, plane, metrics), "127.0.0.1:0")
        await server.start()
        try:
            await asyncio.wait_for(scenario(plane, AdminOperations(plane, metrics), f"127.0.0.1:{port}"), 60)
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


class FakeEnvoy:
    """Answers every push as Envoy does: ACK, or NACK of CDS when told to reject a cluster name."""

    def __init__(self, address: str, node_id: str, *, answering: bool = True) -> None:
        self.client = AdsClient(address, node_id)
        self.reject_cluster: str | None = None
        self.answering = answering
        self.clusters: list[str] = []
        self._backlog: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.client.start()
        for type_url, names in ((CLUSTER, None), (LISTENER, None), (ROUTE, ["gateway"])):
            self.client.send(type_url, names=names)
        self._task = asyncio.create_task(self._answer())

    def resume(self) -> None:
        """Answer what arrived while stuck, and from now on."""
        self.answering = True
        for response in self._backlog:
            self._handle(response)
        self._backlog.clear()

    async def _answer(self) -> None:
        while True:
            response = await self.client.receive(timeout_s=3600)
            if self.answering:
                self._handle(response)
            else:
                self._backlog.append(response)

    def _handle(self, response: Any) -> None:
        if True:
            if response.type_url == CLUSTER:
                names = []
                for resource in response.resources:
                    cluster = cluster_pb2.Cluster()
                    resource.Unpack(cluster)
                    names.append(cluster.name)
                if self.reject_cluster in names:
                    self.client.send(CLUSTER, nonce=response.nonce, error=f"{self.reject_cluster}: no thanks")
                    return
                self.clusters = names
                self.client.ack(response)
                self.client.send(ENDPOINT, nonce=response.nonce, names=names)  # Envoy's re-request
            else:
                self.client.ack(
                    response, names=self.clusters if response.type_url == ENDPOINT else ["gateway"]
                )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.client.close()


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def model(model_id: str, port: int = 9100) -> ModelConfig:
    return ModelConfig.model_validate(
        {"id": model_id, "engine": "tgi", "endpoints": [{"url": f"http://127.0.0.1:{port}"}]}
    )


def test_a_nacked_change_is_rolled_back_stores_nothing_and_the_next_one_goes_through() -> None:
    async def scenario(plane: ControlPlane, ops: AdminOperations, address: str) -> None:
        envoy = FakeEnvoy(address, "envoy-1")
        await envoy.start()
        await until(lambda: plane.cache.synced("envoy-1"), "the first sync")
        before = plane.cache.get_snapshot("envoy-1")
        assert before is not None
        audit_before = plane.store.audit()

        envoy.reject_cluster = "model_bad"
        with pytest.raises(RejectedChangeError) as info:
            await ops.add_model(model("bad"))
        assert "envoy-1" in str(info.value) and "model_bad: no thanks" in str(info.value)
        # Nothing kept: not in the store, not in the registry, not in the audit; the old config is back.
        assert plane.store.rows("SELECT id FROM added_models") == []
        assert plane.store.audit() == audit_before
        assert plane.registry.model("bad") is None
        after = plane.cache.get_snapshot("envoy-1")
        assert after is not None and after.versions[CLUSTER] == before.versions[CLUSTER]
        await until(lambda: plane.cache.synced("envoy-1"), "Envoy to take the old config back")

        # The next valid change is not blocked by the rejected one.
        change = await ops.add_model(model("good"))
        assert change.sync.applied_to == ("envoy-1",) and change.sync.lagging == ()
        assert "model_good" in envoy.clusters and "model_bad" not in envoy.clusters
        assert plane.store.rows("SELECT id FROM added_models") == [("good",)]
        assert plane.node_sync("envoy-1")["last_rejected"]["cds"]["message"] == "model_bad: no thanks"
        await envoy.close()

    run(scenario)


def test_a_lagging_node_is_reported_and_not_waited_for_again() -> None:
    async def scenario(plane: ControlPlane, ops: AdminOperations, address: str) -> None:
        healthy, stuck = FakeEnvoy(address, "healthy"), FakeEnvoy(address, "stuck")
        for envoy in (healthy, stuck):
            await envoy.start()
            await until(lambda e=envoy: plane.cache.synced(e.client._node.id), "the first sync")  # type: ignore[misc]
        stuck.answering = False

        first = await ops.set_enabled("a", False)  # waits the bound (10 s here) for `stuck`
        assert first.sync.applied_to == ("healthy",) and first.sync.lagging == ("stuck",)
        assert plane.node_sync("stuck")["lagging"] is True and plane.node_sync("healthy")["synced"]

        # Known to lag: later calls return as soon as the healthy node answered, far within the bound.
        second = await asyncio.wait_for(ops.add_model(model("m")), timeout=8)
        assert second.sync.as_json() == {
            "applied_to": ["healthy"],
            "lagging": ["stuck"],
            "rejected": {},
            "warning": None,
        }
        status = await asyncio.wait_for(plane.wait_synced(), timeout=8)
        assert status.lagging == ("stuck",)

        # Once it answers again it is no longer lagging.
        stuck.resume()
        await until(lambda: plane.cache.synced("stuck"), "the stuck node to catch up")
        assert plane.node_sync("stuck")["lagging"] is False
        third = await ops.set_model_draining("a", True)
        assert set(third.sync.applied_to) == {"healthy", "stuck"} and third.sync.lagging == ()
        for envoy in (healthy, stuck):
            await envoy.close()

    run(scenario)


def test_with_no_envoy_connected_the_report_says_so() -> None:
    async def scenario(plane: ControlPlane, ops: AdminOperations, address: str) -> None:
        change = await ops.add_model(model("m"))
        assert change.sync.as_json() == {"applied_to": [], "lagging": [], "rejected": {}, "warning": NO_ENVOY}
        assert plane.store.rows("SELECT id FROM added_models") == [("m",)]

    run(scenario)


def test_every_admin_write_reports_the_same_sync_shape() -> None:
    async def scenario(plane: ControlPlane, ops: AdminOperations, address: str) -> None:
        envoy = FakeEnvoy(address, "envoy-1")
        await envoy.start()
        await until(lambda: plane.cache.synced("envoy-1"), "the first sync")
        changes: list[Any] = [
            await ops.add_model(model("m")),
            await ops.add_endpoint("m", model("m", 9200).endpoints[0]),
            await ops.set_endpoint_draining("m-0", True),
            await ops.set_endpoint_draining("m-0", False),
            await ops.set_enabled("m", False),
            await ops.set_model_draining("a", True),
            await ops.remove_endpoint("m-1"),
            await ops.remove_model("m"),
        ]
        for change in changes:
            assert change.sync.as_json() == {
                "applied_to": ["envoy-1"],
                "lagging": [],
                "rejected": {},
                "warning": None,
            }
        await envoy.close()

    run(scenario)
