"""API keys in the profile benchmark (bench_profile.py, rows 4d-4f): what ``auth.mode: api_key`` costs Envoy.

- ``bench_keys``: a table of hashed keys (as the control plane gives Envoy) and one key a client sends;
- ``inline_key_filter``: the listener's key check and the keys' live state, which the control plane
  delivers over ECDS, rendered inline instead (a static bootstrap has no ECDS): the same Lua code, key
  table and live table (builders/keys.py, builders/live.py);
- ``control_plane_cluster``: the bootstrap's ``xds_cluster`` (the control plane's address), for the
  access-log stream and the quota server (RLQS) the keyed listener talks to;
- ``GrpcSink``: a small stand-in for those two services of the control plane, in a thread of this process:
  the real ``AccessLogServicer`` (entries counted, nothing else) and ``QuotaServicer`` (a limit per key so
  high that it never denies);
- ``render_keys``: the keyed rows' table (latency percentiles, CPU against row 4);
- ``check_keyed``: before a keyed variant is measured, a request without the key must get 401 and one with
  it 200, so the figures are those of the checked path.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import threading
import time
import urllib.error
import urllib.request
from base64 import urlsafe_b64encode
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from envoy.config.accesslog.v3 import accesslog_pb2
from google.protobuf import json_format

from control_plane.state import GatewayState, KeyEntry
from control_plane.tenancy.keys import SECRET_PREFIX
from control_plane.tenancy.quota import QuotaServicer, add_quota_servicer
from control_plane.xds.als import AccessLogServicer, add_als_servicer
from control_plane.xds.builders.access_log import CONTROL_PLANE_CLUSTER
from control_plane.xds.builders.keys import KEY_FILTER_NAME, build_key_extension
from control_plane.xds.builders.live import LIVE_FILTER_NAME, LiveEntry, build_live_extension
from control_plane.xds.builders.usage import TOKEN_USAGE_NAMESPACE
from loadtest._common import fmt_ms, markdown_table

KEY_COUNT = 1000
# Every key has a requests-per-minute limit (so the quota server assigns token buckets, and the key check
# writes OpenAI's x-ratelimit-limit-requests header on answers), far above what one Envoy can serve.
RPM_LIMIT = 1_000_000_000


def bench_keys(count: int = KEY_COUNT, seed: int = 7) -> tuple[str, tuple[KeyEntry, ...]]:
    """``count`` keys shaped like the gateway's (``sk-gw-`` + 43 URL-safe characters), as hashed entries,
    and the clear key of the one in the middle (the one the load sends)."""
    rng = random.Random(seed)
    secrets = [
        SECRET_PREFIX + urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("=") for _ in range(count)
    ]
    entries = tuple(
        KeyEntry(
            sha256=hashlib.sha256(secret.encode()).hexdigest(),
            id=f"key_{i:04d}",
            name=f"bench-{i:04d}",
            rpm_limit=RPM_LIMIT,
        )
        for i, secret in enumerate(secrets)
    )
    return secrets[count // 2], entries


def inline_key_filter(listener: dict[str, Any], state: GatewayState) -> None:
    """Replace the listener's ECDS references to the key check and the keys' live state
    (``config_discovery``) by the resources the control plane would push for ``state`` (``typed_config``),
    in place. The live table holds a row for every key, as if all had been used in the last minute."""
    live = tuple(LiveEntry(e.id, requests=1, requests_reset_at=1, in_flight=0) for e in state.keys)
    inlined = {KEY_FILTER_NAME: build_key_extension(state), LIVE_FILTER_NAME: build_live_extension(live)}
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for flt in manager["http_filters"]:
        extension = inlined.pop(flt["name"], None)
        if extension is not None:
            flt.pop("config_discovery")
            flt["typed_config"] = json_format.MessageToDict(extension, preserving_proto_field_name=True)[
                "typed_config"
            ]
    if inlined:
        raise ValueError(f"no {', '.join(inlined)} filter in the listener")


def control_plane_cluster(port: int) -> dict[str, Any]:
    """The bootstrap's cluster of the control plane (as envoy/bootstrap.yaml), at 127.0.0.1:``port``."""
    return {
        "name": CONTROL_PLANE_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": CONTROL_PLANE_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


class _Counter:
    """Access-log entries received, and those carrying the engine's token usage."""

    def __init__(self) -> None:
        self.entries = 0
        self.with_usage = 0

    def record(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        self.entries += 1
        if TOKEN_USAGE_NAMESPACE in entry.common_properties.metadata.typed_filter_metadata:
            self.with_usage += 1


class GrpcSink:
    """The control plane's access-log and quota services on a grpc.aio server, in a thread of its own."""

    def __init__(self) -> None:
        self.port = 0
        self.counter = _Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-sink", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._quota: QuotaServicer | None = None

    def start(self) -> GrpcSink:
        self._thread.start()
        self.port = self._call(self._start)
        return self

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        add_als_servicer(self._server, AccessLogServicer([self.counter]))
        self._quota = QuotaServicer(lambda _key_id: RPM_LIMIT)
        add_quota_servicer(self._server, self._quota)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def quota_buckets(self) -> int:
        """Buckets the quota server has had reports for, over every Envoy stream."""

        async def count() -> int:
            assert self._quota is not None
            return sum(len(buckets) for buckets in self._quota.snapshot().values())

        return self._call(count)

    def _call(self, make: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self._server is not None:
            server = self._server

            async def stop() -> None:
                await server.stop(grace=0.5)

            self._call(stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


def _status(url: str, body: str, headers: Mapping[str, str]) -> int:
    request = urllib.request.Request(
        url, data=body.encode(), headers={"content-type": "application/json", **headers}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def check_keyed(url: str, body: str, key_headers: Mapping[str, str]) -> None:
    """The key check is on the path: no key → 401, the key → 200 (else the figures would be wrong)."""
    without = _status(url, body, {})
    wrong = _status(url, body, {"authorization": "Bearer sk-gw-not-a-key"})
    with_key = _status(url, body, key_headers)
    if (without, wrong, with_key) != (401, 401, 200):
        raise RuntimeError(
            f"the key check is not on the path: no key {without}, a wrong key {wrong}, the key {with_key} "
            "(expected 401, 401, 200)"
        )


def wait_for(what: str, probe: Callable[[], bool], timeout_s: float = 12.0) -> None:
    """Wait until ``probe()`` (bounded): for what the keyed Envoy reports to the control plane."""
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not seen within {timeout_s:g} s")
        time.sleep(0.1)


KEYED_VARIANTS = ("gateway-keys", "gateway-keys-usage", "gateway-keys-quota")


def render_keys(rows: list[dict[str, Any]], c: int) -> str:
    """The keyed rows (4d-4f) next to bare, 4 and 4c: latency at both concurrencies, and the Envoy CPU per
    request against row 4 (keys off), at 1 and ``c`` connections. Empty when no keyed row ran."""
    by = {(r["variant"], r["connections"]): r for r in rows}
    if not any((key, c) in by for key in KEYED_VARIANTS):
        return ""
    base = by.get(("gateway", c))
    table = []
    for key in dict.fromkeys(r["variant"] for r in rows):
        if key not in ("bare", "gateway", "gateway-no-lua", *KEYED_VARIANTS):
            continue
        one, sat = by.get((key, 1)), by.get((key, c))
        if one is None or sat is None:
            continue
        cpu = sat["envoy_cpu_us_per_request"]
        base_cpu = base["envoy_cpu_us_per_request"] if base else math.nan
        table.append(
            [
                one["label"].split(" ", 1)[0].rstrip("."),
                f"{one['rps']:,.0f}",
                fmt_ms(one["p50_ms"], 3),
                fmt_ms(one["p99_ms"], 3),
                f"{sat['rps']:,.0f}",
                fmt_ms(sat["p50_ms"], 2),
                fmt_ms(sat["p99_ms"], 2),
                f"{cpu:.1f} µs",
                f"{cpu - base_cpu:+.1f} µs ({cpu / base_cpu:.2f}x)" if base else "n/a",
                f"{sat['stream_entries'] / sat['requests']:.2f}" if sat["requests"] else "n/a",
                one["errors"] + sat["errors"],
            ]
        )
    return markdown_table(
        [
            "row",
            "req/s c=1",
            "p50 c=1",
            "p99 c=1",
            f"req/s c={c}",
            f"p50 c={c}",
            f"p99 c={c}",
            "Envoy CPU / request",
            "vs row 4",
            "log entries / request",
            "errors",
        ],
        table,
    )
