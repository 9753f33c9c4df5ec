"""The xDS port is closed to strangers: ADS and LRS streams need the node's credential (xds/auth.py).

Through a real control plane and a real Envoy: raw ADS and LRS clients without a credential, with a wrong
one or with another node's are refused before anything is sent, counted and logged without the secret;
their load reports never reach `in_flight`; the real Envoy (whose bootstrap carries its credential) keeps
working; and a node that stops reporting cannot hold a drain's verdict for ever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack
from control_plane.xds.resources import CLUSTER, cluster_name
from tests.integration.conftest import StackFactory
from tests.support.ads_client import AdsClient
from tests.support.gateway import admin_client, chat, eventually, prometheus_value
from tests.support.lrs_client import LrsClient, endpoint_report
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(make_stack: StackFactory) -> LocalStack:
    return make_stack(registry(model("qwen2", "tgi", [free_port(), free_port()])))


def xds_address(stack: LocalStack) -> str:
    return f"127.0.0.1:{stack.xds_port}"


def auth_failures(stack: LocalStack, service: str, reason: str) -> float:
    with httpx.Client(timeout=10) as client:
        return prometheus_value(
            client,
            f"{stack.admin_url}/metrics",
            "llm_gateway_xds_auth_failures_total",
            service=service,
            reason=reason,
        )


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """`eventually` for code running on the event loop (the gRPC clients need it to keep running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout_s}s")


def test_ads_without_the_nodes_credential_gets_nothing(stack: LocalStack) -> None:
    secret = stack.settings.xds_secret
    attempts: dict[str, tuple[str | None, grpc.StatusCode]] = {
        # Each claims the real Envoy's node id, to get its snapshot.
        "none": (None, grpc.StatusCode.UNAUTHENTICATED),
        "not a token": ("hunter2", grpc.StatusCode.UNAUTHENTICATED),
        "the secret itself": (secret, grpc.StatusCode.UNAUTHENTICATED),
        "another node's": (stack.xds_token("intruder"), grpc.StatusCode.PERMISSION_DENIED),
        "forged": ("xds1." + "A" * 43, grpc.StatusCode.PERMISSION_DENIED),
    }

    async def scenario() -> dict[str, grpc.StatusCode]:
        codes = {}
        for name, (credential, _) in attempts.items():
            client = AdsClient(xds_address(stack), "gateway-0", credential=credential)
            await client.start()
            client.send(CLUSTER)
            codes[name] = await client.refused()  # fails if any response came first
            await client.close()
        # The same server serves a node that has its credential.
        good = AdsClient(xds_address(stack), "probe-1", credential=stack.xds_token("probe-1"))
        await good.start()
        good.send(CLUSTER)
        response = await good.receive(timeout_s=10)
        assert response.type_url == CLUSTER and len(response.resources) == 1
        await good.close()
        return codes

    codes = asyncio.run(scenario())
    assert codes == {name: code for name, (_, code) in attempts.items()}
    assert auth_failures(stack, "ads", "missing") == 1
    assert auth_failures(stack, "ads", "malformed") == 2
    assert auth_failures(stack, "ads", "wrong_token") == 2

    # The real Envoy was never disturbed, and nothing secret reached the log.
    with httpx.Client(timeout=10) as client:
        for _ in range(10):
            assert chat(client, stack.envoys[0].url, "qwen2").status_code == 200
    assert stack.control_plane is not None
    log = stack.control_plane.log_text()
    assert log.count("refused ADS stream") == 5
    for credential, _ in attempts.values():
        assert credential is None or credential not in log
    assert stack.xds_token("gateway-0") not in log


def test_load_reports_without_the_credential_do_not_touch_in_flight(stack: LocalStack) -> None:
    with admin_client(stack) as admin:
        address = admin.get("/admin/endpoints/qwen2-0").json()["address"]
        host, port = address.rsplit(":", 1)
        report = endpoint_report(cluster_name("qwen2"), host, int(port), 50)

        def in_flight() -> Any:
            return admin.get("/admin/endpoints/qwen2-0").json()["in_flight"]

        async def scenario() -> None:
            for credential in (None, stack.xds_token("intruder")):
                client = LrsClient(xds_address(stack), "gateway-0", credential=credential)
                # The figures ride on the first message: any message written after the server's refusal
                # would make the gRPC client report its own INTERNAL error instead of the server's status.
                await client.start(report)
                assert await client.refused() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                )
                await client.close()
            assert await asyncio.to_thread(in_flight) == 0
            nodes = (await asyncio.to_thread(admin.get, "/admin/load")).json()["nodes"]
            assert set(nodes) == {"gateway-0"}  # only the real Envoy's reports are held

            # The same report with a node's credential does count (so the checks above can fail).
            good = LrsClient(xds_address(stack), "probe-lrs", credential=stack.xds_token("probe-lrs"))
            await good.start()
            await good.receive(timeout_s=10)
            good.report(report)
            await until(lambda: in_flight() == 50, 10, "the authenticated report to count")
            await good.close()
            await until(lambda: in_flight() == 0, 10, "the closed stream's figures to go")

        asyncio.run(scenario())
    assert auth_failures(stack, "lrs", "missing") == 1
    assert auth_failures(stack, "lrs", "wrong_token") == 1


def test_a_node_that_stops_reporting_cannot_hold_a_drain(stack: LocalStack) -> None:
    """A second, authenticated node connects over ADS and LRS, reports once, then goes silent (streams
    open, no ACKs): the admin call names it as lagging instead of hanging on it, later calls do not wait
    for it again, and the drain still reports done, once that node counts as lagging."""
    token = stack.xds_token("stuck-1")

    with admin_client(stack, timeout_s=30) as admin:

        async def scenario() -> None:
            ads = AdsClient(xds_address(stack), "stuck-1", credential=token)
            await ads.start()
            ads.send(CLUSTER)
            await ads.receive(timeout_s=10)  # never ACKed
            lrs = LrsClient(xds_address(stack), "stuck-1", credential=token)
            await lrs.start()
            await lrs.receive(timeout_s=10)
            lrs.report()  # one (empty) report, then silence

            def stuck_reported() -> bool:
                return "stuck-1" in admin.get("/admin/load").json()["nodes"]

            await until(stuck_reported, 10, "the stuck node's report")
            drain = await asyncio.to_thread(admin.post, "/admin/endpoints/qwen2-0/drain")
            drain.raise_for_status()
            # The real Envoy has the change; the silent node is named, not waited for without end.
            assert drain.json()["sync"]["applied_to"] == ["gateway-0"], drain.json()["sync"]
            assert drain.json()["sync"]["lagging"] == ["stuck-1"], drain.json()["sync"]
            status = (await asyncio.to_thread(admin.get, "/admin/status")).json()
            envoys = {e["node"]: e for e in status["envoys"]}
            assert envoys["stuck-1"]["lagging"] is True and envoys["gateway-0"]["lagging"] is False
            # A later change does not wait the whole bound (3 s) again for a node known to lag.
            started = time.monotonic()
            change = await asyncio.to_thread(admin.post, "/admin/endpoints/qwen2-1/drain")
            assert time.monotonic() - started < 2.5, "a known-lagging node held up the next admin call"
            assert change.json()["sync"]["lagging"] == ["stuck-1"]
            (await asyncio.to_thread(admin.post, "/admin/endpoints/qwen2-1/undrain")).raise_for_status()
            await until(
                lambda: admin.get("/admin/endpoints/qwen2-0").json()["drained"] is True,
                30,
                "the drain to report done despite the silent node",
            )
            assert "stuck-1" in (await asyncio.to_thread(admin.get, "/admin/load")).json()["nodes"]
            await lrs.close()
            await ads.close()

        asyncio.run(scenario())
    with httpx.Client(timeout=10) as client:
        eventually(lambda: chat(client, stack.envoys[0].url, "qwen2").status_code == 200, what="gateway")
