"""The per-key requests-per-minute limit in one real Envoy: the `rate_limit_quota` filter built by
builders/quota.py, the quota server (tenancy/quota.py) in this process as the control plane serves it, the
gateway's local reply rules, and a small upstream. Tens of concurrent clients; the assigned rate holds, the
429 is OpenAI's, and a limit change is in force within a second.

(The key id header is sent by the clients here; in the gateway the API-key check sets it.)"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import openai
import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, json_format, message
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from control_plane.config.schema import GatewaySettings
from control_plane.devstack.procs import ManagedProcess, free_port, http_ok, wait_until
from control_plane.envoy_bootstrap import envoy_binary
from control_plane.tenancy.quota import QuotaServicer, UnknownKey, add_quota_servicer
from control_plane.xds.auth import XdsAuthenticator
from control_plane.xds.builders.access_log import CONTROL_PLANE_CLUSTER
from control_plane.xds.builders.local_reply import build_local_reply_config
from control_plane.xds.builders.quota import KEY_ID_HEADER, build_quota_filter
from tests.support.echo import EchoServer

pytestmark = pytest.mark.integration

T = TypeVar("T")
CLIENTS = 30


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _static_cluster(name: str, port: int, http2: bool = False) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(
                                    socket_address=address_pb2.SocketAddress(
                                        address="127.0.0.1", port_value=port
                                    )
                                )
                            )
                        )
                    ]
                )
            ],
        ),
    )
    cluster.connect_timeout.FromMilliseconds(1000)
    if http2:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
        cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].CopyFrom(_packed(options))
    return cluster


def render_bootstrap(
    path: Path, listen: int, admin: int, upstream: int, quota_server: int, credential: str
) -> Path:
    manager = hcm.HttpConnectionManager(
        stat_prefix="gateway",
        route_config=route_pb2.RouteConfiguration(
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name="all",
                    domains=["*"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"),
                            route=route_components_pb2.RouteAction(cluster="upstream"),
                        )
                    ],
                )
            ]
        ),
        http_filters=[
            build_quota_filter(credential),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_packed(router_pb2.Router())),
        ],
        local_reply_config=build_local_reply_config(GatewaySettings()),
    )
    bootstrap = bootstrap_pb2.Bootstrap()
    bootstrap.node.id = "quota-test"
    bootstrap.node.cluster = "gateway"
    bootstrap.admin.address.socket_address.address = "127.0.0.1"
    bootstrap.admin.address.socket_address.port_value = admin
    bootstrap.static_resources.listeners.append(
        listener_pb2.Listener(
            name="main",
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=listen)
            ),
            filter_chains=[
                listener_components_pb2.FilterChain(
                    filters=[
                        listener_components_pb2.Filter(
                            name="envoy.filters.network.http_connection_manager",
                            typed_config=_packed(manager),
                        )
                    ]
                )
            ],
        )
    )
    bootstrap.static_resources.clusters.extend(
        [_static_cluster("upstream", upstream), _static_cluster(CONTROL_PLANE_CLUSTER, quota_server, True)]
    )
    path.write_text(json_format.MessageToJson(bootstrap))  # JSON is YAML to Envoy
    return path


class QuotaServerThread:
    """The quota servicer on a real gRPC server, on an event loop of its own (the tests are synchronous)."""

    def __init__(self, limits: dict[str, int | None]) -> None:
        self.limits = limits
        self.auth = XdsAuthenticator(SecretStr("quota-integration-secret-0123"), CollectorRegistry())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="quota-server", daemon=True)
        self.servicer = QuotaServicer(self.limit_of, authenticator=self.auth)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def limit_of(self, key_id: str) -> int | None:
        if key_id not in self.limits:
            raise UnknownKey(key_id)
        return self.limits[key_id]

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=10)

    def start(self) -> None:
        self.thread.start()

        async def start() -> int:
            self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            add_quota_servicer(self.server, self.servicer)
            port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
            return port

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=None), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class Gateway:
    def __init__(self, quota: QuotaServerThread, envoy: ManagedProcess, port: int) -> None:
        self.quota = quota
        self.envoy = envoy
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    quota = QuotaServerThread({"k1": 600, "free": None})
    quota.start()
    upstream = EchoServer("m", free_port())
    listen, admin = free_port(), free_port()
    config = render_bootstrap(
        tmp_path / "envoy.json", listen, admin, upstream.port, quota.port, quota.auth.log_token()
    )
    argv = [envoy_binary(), "-c", str(config), "--concurrency", "2", "--disable-hot-restart", "-l", "warning"]
    envoy = ManagedProcess("envoy-quota", argv, tmp_path / "logs" / "envoy.log")
    with upstream.running():
        envoy.start()
        try:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "Envoy ready")
            yield Gateway(quota, envoy, listen)
        finally:
            envoy.stop()
            quota.stop()


def test_the_built_filter_passes_envoys_validation(tmp_path: Path) -> None:
    config = render_bootstrap(
        tmp_path / "envoy.json", free_port(), free_port(), free_port(), free_port(), "xds1.x"
    )
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def hammer(url: str, key_id: str, seconds: float) -> tuple[Counter[int], float, httpx.Response | None]:
    """CLIENTS clients sending back to back for `seconds`: status counts, elapsed time, one 429."""
    statuses: Counter[int] = Counter()
    denied: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        started = time.monotonic()
        deadline = started + seconds

        async def one_client() -> None:
            while time.monotonic() < deadline:
                response = await client.post("/v1/chat/completions", json={}, headers={KEY_ID_HEADER: key_id})
                statuses[response.status_code] += 1
                if response.status_code == 429 and not denied:
                    denied.append(response)

        await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
        elapsed = time.monotonic() - started
    return statuses, elapsed, denied[0] if denied else None


def statuses_now(url: str, key_id: str, count: int = 10) -> list[int]:
    with httpx.Client(base_url=url, timeout=5) as client:
        return [client.get("/v1/models", headers={KEY_ID_HEADER: key_id}).status_code for _ in range(count)]


def wait_for_statuses(url: str, key_id: str, wanted: int, timeout_s: float) -> None:
    wait_until(lambda: set(statuses_now(url, key_id)) == {wanted}, timeout_s, f"every request {wanted}", 0.02)


def figures(gateway: Gateway, key_id: str) -> dict[int, Any]:
    return gateway.quota.call(lambda: gateway.quota.servicer.snapshot().get(key_id, {}))


def test_the_limit_holds_under_concurrent_load_and_changes_within_a_second(gateway: Gateway) -> None:
    # The key's first request creates its bucket: allowed, and answered with the whole limit (one Envoy).
    assert statuses_now(gateway.url, "k1", 1) == [200]
    wait_until(
        lambda: any(f.action == "token_bucket" for f in figures(gateway, "k1").values()), 10, "assignment"
    )
    assert [f.assigned_per_minute for f in figures(gateway, "k1").values()] == [600]

    statuses, elapsed, denied = asyncio.run(hammer(gateway.url, "k1", 3.0))
    allowed = statuses[200]
    # 10 per second, plus the 10 the bucket holds (it starts full); the second request of the warm-up
    # may have taken one. Far more were asked for.
    assert set(statuses) == {200, 429}, statuses
    assert statuses[429] > 5 * allowed
    assert allowed <= 10 + 10 * elapsed + 2, (allowed, elapsed)
    assert allowed >= 0.6 * 10 * min(elapsed, 3.0), (allowed, elapsed)

    assert denied is not None
    assert denied.headers["retry-after"] == "1"
    assert denied.headers["x-gateway-error-code"] == "rate_limit_exceeded"
    assert denied.headers["content-type"] == "application/json"
    error = denied.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert error["message"].startswith("Rate limit reached for requests")

    # The official SDK sees its RateLimitError (the bucket is empty after the load).
    sdk = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, default_headers={KEY_ID_HEADER: "k1"}
    )
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(40):
            sdk.models.list()
    assert caught.value.code == "rate_limit_exceeded"

    # A key change reaches Envoy within a second: the limit lifted ...
    gateway.quota.limits["k1"] = None
    gateway.quota.call(gateway.quota.servicer.limits_changed)
    wait_for_statuses(gateway.url, "k1", 200, timeout_s=1.0)
    # ... and the key revoked.
    del gateway.quota.limits["k1"]
    gateway.quota.call(gateway.quota.servicer.limits_changed)
    wait_for_statuses(gateway.url, "k1", 429, timeout_s=1.0)
    assert gateway.envoy.alive()


def test_requests_without_a_key_id_or_with_an_unlimited_key_are_not_limited(gateway: Gateway) -> None:
    assert statuses_now(gateway.url, "free", 1) == [200]
    wait_until(
        lambda: any(f.action == "allow_all" for f in figures(gateway, "free").values()), 10, "assignment"
    )
    statuses, elapsed, _ = asyncio.run(hammer(gateway.url, "free", 1.0))
    # (The small test upstream may refuse some of this load: 503s, never a 429.)
    assert statuses[429] == 0 and statuses[200] > 50 * elapsed, statuses
    with httpx.Client(base_url=gateway.url, timeout=5) as client:
        assert {client.get("/v1/models").status_code for _ in range(50)} == {200}
    assert set(gateway.quota.call(gateway.quota.servicer.snapshot)) == {"free"}
