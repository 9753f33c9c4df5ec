"""xDS authentication in front of the real ADS and LRS servicers (in-process gRPC server, raw clients)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from pydantic import SecretStr

from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.xds.auth import XdsAuthenticator, node_token
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.lrs import LoadReportingServicer, LoadReportStore, add_lrs_servicer
from control_plane.xds.resources import CLUSTER
from control_plane.xds.server import AdsServicer, create_grpc_server
from tests.support.ads_client import AdsClient
from tests.support.lrs_client import LrsClient, endpoint_report

pytestmark = pytest.mark.unit

SECRET = "unit-test-secret-0123456789"
Scenario = Callable[[str, ControlPlaneMetrics, LoadReportStore], Awaitable[None]]


def run(scenario: Scenario) -> None:
    async def main() -> None:
        metrics = ControlPlaneMetrics.create()
        registry = parse_registry(
            {"models": [{"id": "a", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:9000"}]}]}
        )
        plane = ControlPlane(registry, cache=SnapshotCache(), metrics=metrics, resolver=lambda h: h)
        auth = XdsAuthenticator(SecretStr(SECRET), metrics.registry, first_request_timeout_s=0.5)
        store = LoadReportStore(interval_s=1.0)
        server, port = create_grpc_server(AdsServicer(plane.cache, plane, metrics, auth), "127.0.0.1:0")
        add_lrs_servicer(server, LoadReportingServicer(store, authenticator=auth))
        await server.start()
        try:
            await asyncio.wait_for(scenario(f"127.0.0.1:{port}", metrics, store), timeout=20)
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


def failures(metrics: ControlPlaneMetrics, service: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "llm_gateway_xds_auth_failures_total", {"service": service, "reason": reason}
    )
    return value or 0.0


def test_node_tokens_are_bound_to_node_and_secret() -> None:
    token = node_token(SECRET, "gateway-0")
    assert token.startswith("xds1.")
    assert token == node_token(SecretStr(SECRET), "gateway-0")
    assert token != node_token(SECRET, "gateway-1")
    assert token != node_token(SECRET + "x", "gateway-0")
    assert SECRET not in token


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        XdsAuthenticator(SecretStr("short"))


@pytest.mark.parametrize(
    ("credential", "code", "reason"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED, "missing"),
        ("nonsense", grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        (SECRET, grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        (node_token(SECRET, "someone-else"), grpc.StatusCode.PERMISSION_DENIED, "wrong_token"),
        (node_token("other-deployment-secret", "envoy-1"), grpc.StatusCode.PERMISSION_DENIED, "wrong_token"),
    ],
)
def test_ads_without_the_nodes_credential_gets_nothing(
    credential: str | None, code: grpc.StatusCode, reason: str
) -> None:
    async def scenario(address: str, metrics: ControlPlaneMetrics, store: LoadReportStore) -> None:
        client = AdsClient(address, "envoy-1", credential=credential)
        await client.start()
        client.send(CLUSTER)
        assert await client.refused() == code
        await client.close()
        assert failures(metrics, "ads", reason) == 1
        assert metrics.registry.get_sample_value("llm_gateway_xds_connected_envoys") == 0
        # The node's own credential is served by the same server.
        good = AdsClient(address, "envoy-1", credential=node_token(SECRET, "envoy-1"))
        await good.start()
        good.send(CLUSTER)
        response = await good.receive()
        assert response.type_url == CLUSTER and response.resources
        await good.close()

    run(scenario)


def test_a_client_that_never_names_its_node_is_cut_off() -> None:
    async def scenario(address: str, metrics: ControlPlaneMetrics, store: LoadReportStore) -> None:
        client = AdsClient(address, "envoy-1", credential=node_token(SECRET, "envoy-1"))
        await client.start()  # sends nothing
        assert await client.refused() == grpc.StatusCode.UNAUTHENTICATED
        await client.close()
        assert failures(metrics, "ads", "timeout") == 1

    run(scenario)


def test_load_reports_without_the_credential_are_not_recorded() -> None:
    async def scenario(address: str, metrics: ControlPlaneMetrics, store: LoadReportStore) -> None:
        bad = LrsClient(address, "envoy-1", credential=node_token(SECRET, "envoy-2"))
        await bad.start()
        bad.report(endpoint_report("model_a", "127.0.0.1", 9000, 40))
        assert await bad.refused() == grpc.StatusCode.PERMISSION_DENIED
        await bad.close()
        assert store.known_nodes() == set()
        assert store.in_flight("127.0.0.1:9000") == 0
        assert failures(metrics, "lrs", "wrong_token") == 1

        good = LrsClient(address, "envoy-1", credential=node_token(SECRET, "envoy-1"))
        await good.start()
        await good.receive()
        good.report(endpoint_report("model_a", "127.0.0.1", 9000, 40))
        ok = await store.wait_until(lambda: store.in_flight("127.0.0.1:9000") == 40, timeout_s=5)
        assert ok
        await good.close()

    run(scenario)
