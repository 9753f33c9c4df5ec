"""Control-plane scale: snapshot build and push for 10, 100 and 1000 models x 4 endpoints.

- **Build** (in-process, pure): ``build_state`` and ``build_snapshot`` on a generated registry (one alias
  per model, IP-literal endpoints), each stage timed on its own, the consistency check, and the
  serialized size of each resource type.
- **A health flip** (in-process): ``ControlPlane.set_health`` with one connected node, i.e. what the
  control plane does on the event loop for every health change: a new state, a whole new snapshot, the
  consistency check, the cache.
- **Push and ACK with 10 ADS clients**: an in-process ``ControlPlane`` + ``AdsServicer`` gRPC server, and
  10 lightweight ADS clients in one child process (this module's ``--ads-clients`` mode) that speak
  state-of-the-world xDS as Envoy does (CDS, then EDS for the clusters, LDS, then RDS; every response
  ACKed, EDS re-requested after every CDS push). Timed: from the change to the moment the server has
  every client's ACK of the new version of every type (``SnapshotCache.synced``), for an EDS-only change
  (a health flip) and a CDS+EDS+RDS change (a model added or removed).
- **The same with one real Envoy** (``--concurrency 1``), which also parses and applies the config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import math
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.config import parse_registry
from control_plane.config.schema import Registry
from control_plane.devstack.procs import ManagedProcess, free_port, http_ok
from control_plane.envoy_bootstrap import REPO_ROOT, BootstrapParams, envoy_binary, render_bootstrap
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.state import Health, NodeParams, build_state
from control_plane.xds.builders import build_snapshot
from control_plane.xds.builders.cluster import build_cluster
from control_plane.xds.builders.endpoint import build_load_assignment
from control_plane.xds.builders.listener import build_listener
from control_plane.xds.builders.route import build_route_configuration
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.lrs import LoadReportingServicer, LoadReportStore, add_lrs_servicer
from control_plane.xds.resources import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SHORT_NAMES
from control_plane.xds.server import AdsServicer, create_grpc_server
from control_plane.xds.snapshot import Snapshot
from loadtest._common import SectionResult, fmt_ms, markdown_table, percentile


@dataclass(frozen=True)
class ScaleSettings:
    sizes: tuple[int, ...] = (10, 100, 1000)
    endpoints: int = 4
    build_repeats: int = 5
    flip_repeats: int = 5
    ads_clients: int = 10
    ads_repeats: int = 10
    real_envoy_sizes: tuple[int, ...] = (10, 100, 1000)
    real_envoy_repeats: int = 5
    time_budget_s: float = 150.0


def identity(host: str) -> str:
    return host


def registry_doc(models: int, endpoints: int, extra: int = 0) -> dict[str, Any]:
    """``models`` models (plus ``extra`` more) with one alias each and IP-literal endpoints."""
    return {
        "models": [
            {
                "id": f"model-{i:04d}",
                "aliases": [f"alias-{i:04d}"],
                "engine": "vllm",
                "endpoints": [
                    {"id": f"model-{i:04d}-{j}", "url": f"http://10.{(i >> 8) & 255}.{i & 255}.{j + 1}:8000"}
                    for j in range(endpoints)
                ],
            }
            for i in range(models + extra)
        ]
    }


def generated_registry(models: int, endpoints: int, extra: int = 0) -> Registry:
    return parse_registry(registry_doc(models, endpoints, extra))


def _median_ms(values: Sequence[float]) -> float:
    return statistics.median(values) * 1000 if values else math.nan


# ------------------------------------------------------------------ pure build
def time_build(models: int, endpoints: int, repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    doc = registry_doc(models, endpoints)
    registry = parse_registry(doc)
    parse_s = time.perf_counter() - t0
    node = NodeParams()
    stages: dict[str, list[float]] = {
        k: [] for k in ("state", "clusters", "assignments", "routes", "listener", "hash", "build", "check")
    }
    snapshot: Snapshot | None = None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        state = build_state(registry, identity)
        stages["state"].append(time.perf_counter() - t)
        # The stages of build_snapshot, one by one (same calls, same order).
        t = time.perf_counter()
        clusters = [build_cluster(m) for m in state.models]
        stages["clusters"].append(time.perf_counter() - t)
        t = time.perf_counter()
        assignments = [build_load_assignment(m) for m in state.models]
        stages["assignments"].append(time.perf_counter() - t)
        t = time.perf_counter()
        route = build_route_configuration(state)
        stages["routes"].append(time.perf_counter() - t)
        t = time.perf_counter()
        listener = build_listener(state.settings, node)
        stages["listener"].append(time.perf_counter() - t)
        t = time.perf_counter()
        Snapshot.create(
            {
                CLUSTER: {c.name: c for c in clusters},
                ENDPOINT: {a.cluster_name: a for a in assignments},
                LISTENER: {listener.name: listener},
                ROUTE: {route.name: route},
            }
        )
        stages["hash"].append(time.perf_counter() - t)
        # And the real thing, whole.
        t = time.perf_counter()
        snapshot = build_snapshot(state, node)
        stages["build"].append(time.perf_counter() - t)
        t = time.perf_counter()
        snapshot.consistency_problems()
        stages["check"].append(time.perf_counter() - t)
    assert snapshot is not None
    sizes = {SHORT_NAMES[t]: sum(r.ByteSize() for r in snapshot.resources[t].values()) for t in PUSH_ORDER}
    return {
        "models": models,
        "endpoints": models * endpoints,
        "parse_ms": parse_s * 1000,
        "median_ms": {k: _median_ms(v) for k, v in stages.items()},
        "max_build_ms": max(stages["build"]) * 1000,
        "bytes": sizes,
        "total_bytes": sum(sizes.values()),
        "resources": {SHORT_NAMES[t]: len(snapshot.resources[t]) for t in PUSH_ORDER},
    }


# ------------------------------------------------------------------ a health flip in the control plane
def _flip_target(health: Health) -> Health:
    return Health.UNHEALTHY if health is Health.HEALTHY else Health.HEALTHY


def measure_health_flip(
    models: int, repeats: int, profile_top: int = 0, endpoints: int = 4
) -> dict[str, Any]:
    """Time ``ControlPlane.set_health`` (state + snapshot + check + cache) with one node connected."""
    registry = generated_registry(models, endpoints)
    plane = ControlPlane(
        registry, cache=SnapshotCache(), metrics=ControlPlaneMetrics.create(), resolver=identity
    )
    plane.node_connected(base_pb2.Node(id="bench-node"))
    endpoint = "model-0000-0"
    health = Health.HEALTHY
    plane.set_health(endpoint, health)
    times = []
    for _ in range(max(1, repeats)):
        health = _flip_target(health)
        t = time.perf_counter()
        plane.set_health(endpoint, health)
        times.append(time.perf_counter() - t)
    result: dict[str, Any] = {
        "models": models,
        "median_ms": _median_ms(times),
        "times_ms": [x * 1000 for x in times],
    }
    if profile_top:
        profiler = cProfile.Profile()
        health = _flip_target(health)
        profiler.enable()
        plane.set_health(endpoint, health)
        profiler.disable()
        stats = pstats.Stats(profiler, stream=io.StringIO())
        rows = []
        for (filename, line, func), (_cc, calls, _tt, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            if "control_plane" in filename:
                rows.append(
                    (cumtime, f"{Path(filename).parent.name}/{Path(filename).name}:{line}({func})", calls)
                )
        rows.sort(reverse=True)
        result["profile"] = [{"function": f, "calls": c, "cumtime_s": t} for t, f, c in rows[:profile_top]]
        table = markdown_table(
            ["control-plane function", "calls", "cumulative"],
            [[f"`{f}`", c, fmt_ms(t * 1000, 1)] for t, f, c in rows[:profile_top]],
        )
        result["markdown"] = (
            f"One health flip (`ControlPlane.set_health`) at {models} models, one node connected: median "
            f"{result['median_ms']:.0f} ms over {len(times)} flips, all of it on the event loop. "
            "Under cProfile, our functions by cumulative time:\n\n" + table
        )
    return result


# ------------------------------------------------------------------ ADS clients (child process)
class EnvoyLikeClient:
    """State-of-the-world ADS as Envoy speaks it: CDS, then EDS for the clusters, LDS, then RDS; every
    response ACKed; EDS re-requested (with the last EDS version and nonce) after every CDS response."""

    def __init__(self, address: str, node_id: str) -> None:
        self.node_id = node_id
        self._channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        )
        self._stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self._node = base_pb2.Node(id=node_id, cluster="bench")
        self.versions: dict[str, str] = {}
        self._nonces: dict[str, str] = {}
        self._names: dict[str, list[str]] = {ENDPOINT: [], ROUTE: []}
        self.synced = asyncio.Event()
        self.responses = 0

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    def _send(self, type_url: str) -> None:
        self._outbox.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=self.versions.get(type_url, ""),
                response_nonce=self._nonces.get(type_url, ""),
                resource_names=self._names.get(type_url, []),
                node=self._node,
            )
        )

    async def run(self) -> None:
        call = self._stub.StreamAggregatedResources(self._requests())
        self._send(CLUSTER)
        async for response in call:
            self.responses += 1
            type_url = response.type_url
            self.versions[type_url] = response.version_info
            self._nonces[type_url] = response.nonce
            if type_url == CLUSTER:
                names = []
                for item in response.resources:
                    cluster = cluster_pb2.Cluster()
                    item.Unpack(cluster)
                    names.append(cluster.name)
                self._names[ENDPOINT] = sorted(names)
                self._send(CLUSTER)  # ACK
                self._send(ENDPOINT)  # re-request EDS for the (new) clusters, as Envoy does
                if LISTENER not in self._nonces:
                    self._send(LISTENER)
            elif type_url == LISTENER:
                self._send(LISTENER)
                if not self._names[ROUTE]:
                    self._names[ROUTE] = ["gateway"]
                    self._send(ROUTE)
            else:
                self._send(type_url)
            if len(self.versions) == len(PUSH_ORDER):
                self.synced.set()

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        await self._channel.close()


async def _clients_main(address: str, count: int, prefix: str, lifetime_s: float) -> None:
    clients = [EnvoyLikeClient(address, f"{prefix}-{i}") for i in range(count)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(c.synced.wait() for c in clients)), timeout=lifetime_s)
    print(f"READY {time.monotonic() - started:.6f}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(1.0, lifetime_s - (time.monotonic() - started)))
    for task in tasks:
        task.cancel()
    for client in clients:
        with contextlib.suppress(Exception):  # closing races the cancelled streams
            await client.close()


def nacks(metrics: ControlPlaneMetrics) -> dict[str, int]:
    out = {}
    for short in ("cds", "eds", "lds", "rds"):
        value = metrics.registry.get_sample_value("llm_gateway_xds_nacks_total", {"type": short})
        if value:
            out[short] = int(value)
    return out


# ------------------------------------------------------------------ push / ACK measurements
async def _wait_synced(plane: ControlPlane, nodes: Sequence[str], timeout_s: float) -> float:
    """Seconds until every node has answered the current snapshot (polled every 0.5 ms); NaN on timeout."""
    started = time.perf_counter()
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if all(plane.cache.synced(n) for n in nodes):
            return time.perf_counter() - started
        await asyncio.sleep(0.0005)
    return math.nan


async def _changes(
    plane: ControlPlane,
    nodes: Sequence[str],
    registry: Registry,
    bigger: Registry,
    repeats: int,
    deadline: float,
) -> dict[str, Any]:
    """EDS-only changes (health flips) then CDS changes (a model added, removed), each until all ACKed."""
    eds_call, eds_acked, cds_call, cds_acked = [], [], [], []
    health = Health.HEALTHY
    for _ in range(repeats):
        if time.monotonic() > deadline:
            break
        health = _flip_target(health)
        t = time.perf_counter()
        plane.set_health("model-0000-0", health)
        call = time.perf_counter() - t
        acked = await _wait_synced(plane, nodes, 60)
        eds_call.append(call)
        eds_acked.append(call + acked)
    for i in range(repeats):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter()
        await plane.apply_registry(bigger if i % 2 == 0 else registry)
        call = time.perf_counter() - t
        acked = await _wait_synced(plane, nodes, 60)
        cds_call.append(call)
        cds_acked.append(call + acked)
    if len(cds_call) % 2:
        await plane.apply_registry(registry)
        await _wait_synced(plane, nodes, 60)

    def summary(values: list[float]) -> dict[str, float]:
        ms = [v * 1000 for v in values]
        return {"n": len(ms), "p50_ms": percentile(ms, 50), "max_ms": max(ms, default=math.nan)}

    return {
        "eds_build": summary(eds_call),
        "eds_all_acked": summary(eds_acked),
        "cds_apply": summary(cds_call),
        "cds_all_acked": summary(cds_acked),
    }


async def _serve(plane: ControlPlane, metrics: ControlPlaneMetrics) -> tuple[grpc.aio.Server, int]:
    server, port = create_grpc_server(AdsServicer(plane.cache, plane, metrics), "127.0.0.1:0")
    add_lrs_servicer(server, LoadReportingServicer(LoadReportStore(interval_s=1.0)))
    await server.start()
    return server, port


async def ads_with_clients(models: int, settings: ScaleSettings, deadline: float) -> dict[str, Any]:
    registry = generated_registry(models, settings.endpoints)
    bigger = generated_registry(models, settings.endpoints, extra=1)
    metrics = ControlPlaneMetrics.create()
    plane = ControlPlane(registry, cache=SnapshotCache(), metrics=metrics, resolver=identity)
    server, port = await _serve(plane, metrics)
    nodes = [f"client-{i}" for i in range(settings.ads_clients)]
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.bench_scale",
        "--ads-clients",
        str(settings.ads_clients),
        "--address",
        f"127.0.0.1:{port}",
        "--prefix",
        "client",
        "--lifetime",
        "600",
        stdout=asyncio.subprocess.PIPE,
        cwd=str(REPO_ROOT),
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), timeout=120)
        if not line.startswith(b"READY"):
            raise RuntimeError(f"ADS clients did not start: {line!r}")
        initial_s = float(line.split()[1])
        await _wait_synced(plane, nodes, 60)
        result = await _changes(plane, nodes, registry, bigger, settings.ads_repeats, deadline)
        result["initial_sync_ms"] = initial_s * 1000
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), timeout=10)
        except TimeoutError:
            child.kill()
            await child.wait()
        await server.stop(grace=None)
    return {"models": models, "clients": settings.ads_clients, "nacks": nacks(metrics), **result}


async def ads_with_envoy(
    models: int, settings: ScaleSettings, deadline: float, work: Path
) -> dict[str, Any]:
    registry = generated_registry(models, settings.endpoints)
    bigger = generated_registry(models, settings.endpoints, extra=1)
    metrics = ControlPlaneMetrics.create()
    plane = ControlPlane(registry, cache=SnapshotCache(), metrics=metrics, resolver=identity)
    server, port = await _serve(plane, metrics)
    admin_port, listen_port = free_port(), free_port()
    bootstrap = work / f"envoy-scale-{models}-{time.monotonic_ns()}.yaml"
    bootstrap.write_text(
        render_bootstrap(
            BootstrapParams(
                node_id="scale-envoy", xds_port=port, admin_port=admin_port, listen_port=listen_port
            )
        )
    )
    argv = [envoy_binary(), "-c", str(bootstrap), "--concurrency", "1", "--log-level", "warning"]
    argv += ["--disable-hot-restart", "--drain-time-s", "1"]
    envoy = ManagedProcess(f"envoy-scale-{models}", argv, bootstrap.with_suffix(".log"))
    started = time.perf_counter()
    envoy.start()
    try:
        initial = math.nan
        while time.perf_counter() - started < 120:
            if not envoy.alive():
                raise RuntimeError(f"Envoy exited:\n{envoy.log_text()[-2000:]}")
            if "scale-envoy" in plane.connected_nodes() and plane.cache.synced("scale-envoy"):
                initial = time.perf_counter() - started
                break
            await asyncio.sleep(0.005)
        ready = await asyncio.to_thread(http_ok, f"http://127.0.0.1:{admin_port}/ready", 5.0)
        result = await _changes(
            plane, ["scale-envoy"], registry, bigger, settings.real_envoy_repeats, deadline
        )
        result["initial_sync_ms"] = initial * 1000
        result["envoy_ready"] = ready
    finally:
        envoy.stop()
        await server.stop(grace=None)
    return {"models": models, "clients": "1 Envoy", "nacks": nacks(metrics), **result}


# ------------------------------------------------------------------ section
def render(builds: list[dict[str, Any]], flips: list[dict[str, Any]], ads: list[dict[str, Any]]) -> str:
    build_rows = []
    for b in builds:
        m = b["median_ms"]
        build_rows.append(
            [
                f"{b['models']} x 4",
                fmt_ms(m["state"], 1),
                fmt_ms(m["clusters"], 1),
                fmt_ms(m["assignments"], 1),
                fmt_ms(m["routes"], 1),
                fmt_ms(m["hash"], 1),
                f"**{fmt_ms(m['build'], 1)}**",
                fmt_ms(m["check"], 1),
                " / ".join(f"{b['bytes'][k] / 1024:,.0f}" for k in ("cds", "eds", "lds", "rds")),
                f"{b['total_bytes'] / 1024:,.0f} KiB",
            ]
        )
    flip_by = {f["models"]: f for f in flips}
    for row, b in zip(build_rows, builds, strict=True):
        f = flip_by.get(b["models"])
        row.append(fmt_ms(f["median_ms"], 1) if f else "n/a")
    build_table = markdown_table(
        [
            "models x endpoints",
            "state",
            "clusters",
            "endpoints",
            "routes",
            "hash",
            "build_snapshot",
            "check",
            "KiB cds / eds / lds / rds",
            "serialized",
            "health flip",
        ],
        build_rows,
    )
    ads_rows = [
        [
            a["models"],
            a["clients"],
            fmt_ms(a["initial_sync_ms"], 0),
            fmt_ms(a["eds_build"]["p50_ms"], 1),
            fmt_ms(a["eds_all_acked"]["p50_ms"], 1),
            fmt_ms(a["eds_all_acked"]["max_ms"], 1),
            fmt_ms(a["cds_apply"]["p50_ms"], 1),
            fmt_ms(a["cds_all_acked"]["p50_ms"], 1),
            fmt_ms(a["cds_all_acked"]["max_ms"], 1),
            f"{a['eds_all_acked']['n']} / {a['cds_all_acked']['n']}",
            ", ".join(f"{k} {v}" for k, v in a.get("nacks", {}).items()) or "0",
        ]
        for a in ads
    ]
    ads_table = markdown_table(
        [
            "models",
            "ADS clients",
            "initial sync",
            "health flip: build",
            "→ all ACKed p50",
            "max",
            "model added: apply",
            "→ all ACKed p50",
            "max",
            "changes (eds / cds)",
            "NACKs",
        ],
        ads_rows,
    )
    return (
        "Build, in-process, medians (state = `build_state`; clusters, endpoints, routes = the builders; "
        "hash = `Snapshot.create`'s content versions; check = `consistency_problems`; health flip = "
        "`ControlPlane.set_health` with one node, all of it):\n\n"
        + build_table
        + "\n\nPush: from the change to the server holding every client's ACK of every changed type "
        '("build"/"apply" = the control plane\'s own call, included in the ACK time):\n\n' + ads_table + "\n"
    )


async def _ads_all(settings: ScaleSettings, deadline: float, work: Path) -> list[dict[str, Any]]:
    out = []
    for models in settings.sizes:
        if time.monotonic() > deadline:
            break
        print(f"[scale] ADS, {settings.ads_clients} clients, {models} models", file=sys.stderr)
        out.append(await ads_with_clients(models, settings, deadline))
    for models in settings.real_envoy_sizes:
        if time.monotonic() > deadline:
            break
        print(f"[scale] ADS, one real Envoy, {models} models", file=sys.stderr)
        out.append(await ads_with_envoy(models, settings, deadline, work))
    return out


def run(settings: ScaleSettings) -> SectionResult:
    started = time.monotonic()
    deadline = started + settings.time_budget_s
    builds = []
    flips = []
    for models in settings.sizes:
        print(f"[scale] build, {models} models", file=sys.stderr)
        repeats = settings.build_repeats if models <= 100 else max(1, settings.build_repeats // 2 + 1)
        builds.append(time_build(models, settings.endpoints, repeats))
        flips.append(measure_health_flip(models, settings.flip_repeats, endpoints=settings.endpoints))
    with tempfile.TemporaryDirectory(prefix="llm-gw-scale-") as tmp:
        ads = asyncio.run(_ads_all(settings, deadline, Path(tmp)))
    markdown = render(builds, flips, ads)
    data = {"settings": asdict(settings), "builds": builds, "health_flips": flips, "ads": ads}
    return SectionResult("scale", "Control-plane scale", markdown, data, time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_scale")
    p.add_argument("--ads-clients", type=int, default=0, help="run N Envoy-like ADS clients (child mode)")
    p.add_argument("--address", default="127.0.0.1:18000")
    p.add_argument("--prefix", default="client")
    p.add_argument("--lifetime", type=float, default=600.0, help="exit after this many seconds at most")
    args = p.parse_args(argv)
    if args.ads_clients:
        asyncio.run(_clients_main(args.address, args.ads_clients, args.prefix, args.lifetime))
        return 0
    result = run(ScaleSettings())
    print(result.markdown)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
