"""Gateway overhead: the same fast backend called directly, through a bare Envoy, and through the gateway.

- **direct**: ``loadtest.bench_upstream`` (a bare asyncio HTTP/1.1 server answering every POST with the
  same small chat completion) on its own port.
- **bare Envoy**: a static bootstrap rendered here: one listener, one HTTP connection manager with only
  the router filter, one route (``prefix: /``), one static cluster to the backend. The floor for any
  Envoy-based gateway.
- **gateway**: the full local stack (control plane over ADS, header_to_metadata + buffer +
  json_to_metadata + router, the generated route table, least request, circuit breakers, outlier
  detection, retry policy), the backend as the model's one endpoint.

Both Envoys run with ``--concurrency 1`` (one worker thread). The load is ``wrk -t1`` (one client
thread) in a closed loop at each concurrency, with the same JSON body; concurrencies run in turn, the
three paths side by side for each.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from control_plane.devstack.procs import free_port
from loadtest._common import (
    ProcessCpu,
    SectionResult,
    fmt_ms,
    fmt_x,
    host_cpu_times,
    local_stack,
    markdown_table,
    ratio,
    run_load,
    start_static_envoy,
    start_upstream,
    wait_routable,
    wrk_binary,
)

MODEL = "bench"
BODY = (
    '{"model":"bench","messages":[{"role":"user","content":"Say hello to the gateway benchmark."}],'
    '"max_tokens":16}'
)
PATH = "/v1/chat/completions"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


@dataclass(frozen=True)
class OverheadSettings:
    concurrencies: tuple[int, ...] = (1, 8, 32, 64)
    duration_s: float = 3.0
    warmup_s: float = 1.0


def bare_bootstrap(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """The floor: one listener, one route, one cluster, the router filter and nothing else."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bare",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM_TYPE,
                                        "stat_prefix": "bare",
                                        "route_config": {
                                            "name": "bare",
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "upstream"},
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER_TYPE},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def gateway_registry(upstream_port: int) -> dict[str, Any]:
    return {
        "models": [
            {
                "id": MODEL,
                "engine": "vllm",
                "endpoints": [{"id": f"{MODEL}-0", "url": f"http://127.0.0.1:{upstream_port}"}],
            }
        ]
    }


def measure(
    targets: dict[str, str], pids: dict[str, dict[str, int | None]], settings: OverheadSettings
) -> list[dict[str, Any]]:
    """For each concurrency, each target in turn: a warm-up run, then a measured run with CPU per process."""
    rows = []
    for connections in settings.concurrencies:
        for name, url in targets.items():
            run_load(url, BODY, connections, settings.warmup_s)
            cpu = ProcessCpu(pids[name])
            busy0, total0 = host_cpu_times()
            cpu.start()
            result = run_load(url, BODY, connections, settings.duration_s)
            cores = cpu.stop()
            busy1, total1 = host_cpu_times()
            cores["host"] = (
                (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1) if total1 > total0 else math.nan
            )
            cores["client"] = result.client_cpu_s / result.duration_s
            envoy_us = (
                cpu.seconds.get("envoy", math.nan) / result.requests * 1e6 if result.requests else math.nan
            )
            rows.append(
                {
                    "path": name,
                    **asdict(result),
                    "rps": result.rps,
                    "cores": cores,
                    "envoy_cpu_us_per_request": envoy_us,
                }
            )
    return rows


def _rows_by(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["path"], r["connections"]): r for r in rows}


LABELS = {"direct": "direct", "bare": "bare Envoy", "gateway": "gateway"}


def render(rows: list[dict[str, Any]], settings: OverheadSettings, client: str) -> str:
    by = _rows_by(rows)
    table = []
    for r in rows:
        cores = r["cores"]
        table.append(
            [
                r["connections"],
                LABELS[r["path"]],
                f"{r['rps']:,.0f}",
                fmt_ms(r["p50_ms"], 3),
                fmt_ms(r["p99_ms"], 3),
                r["errors"],
                f"{cores.get('envoy', math.nan):.2f}" if "envoy" in cores else "-",
                f"{r['envoy_cpu_us_per_request']:.1f} µs" if "envoy" in cores else "-",
                f"{cores.get('upstream', math.nan):.2f}",
                f"{cores.get('client', math.nan):.2f}",
                f"{cores.get('host', math.nan):.2f}",
            ]
        )
    abs_table = markdown_table(
        [
            "concurrency",
            "path",
            "req/s",
            "p50",
            "p99",
            "errors",
            "Envoy cores",
            "Envoy CPU / request",
            "backend cores",
            f"{client} cores",
            "host cores busy",
        ],
        table,
        "rlrrrrrrrrr",
    )
    ratio_rows = []
    for c in settings.concurrencies:
        d, b, g = by.get(("direct", c)), by.get(("bare", c)), by.get(("gateway", c))
        if not (d and b and g):
            continue
        for name, r in (("bare", b), ("gateway", g)):
            ratio_rows.append(
                [
                    c,
                    LABELS[name],
                    f"+{(r['p50_ms'] - d['p50_ms']) * 1000:.0f} µs",
                    fmt_x(ratio(r["p50_ms"], d["p50_ms"])),
                    fmt_x(ratio(r["p99_ms"], d["p99_ms"])),
                    fmt_x(ratio(r["rps"], d["rps"])),
                    f"+{(r['p50_ms'] - b['p50_ms']) * 1000:.0f} µs" if name == "gateway" else "-",
                    fmt_x(ratio(r["p50_ms"], b["p50_ms"])) if name == "gateway" else "-",
                    fmt_x(ratio(r["p99_ms"], b["p99_ms"])) if name == "gateway" else "-",
                    fmt_x(ratio(r["rps"], b["rps"])) if name == "gateway" else "-",
                    f"+{r['envoy_cpu_us_per_request'] - b['envoy_cpu_us_per_request']:.1f} µs "
                    f"({fmt_x(ratio(r['envoy_cpu_us_per_request'], b['envoy_cpu_us_per_request']))})"
                    if name == "gateway"
                    else "-",
                ]
            )
    rel_table = markdown_table(
        [
            "concurrency",
            "path",
            "p50 added vs direct",
            "p50 / direct",
            "p99 / direct",
            "req/s / direct",
            "p50 added vs bare",
            "p50 / bare",
            "p99 / bare",
            "req/s / bare",
            "Envoy CPU / request vs bare",
        ],
        ratio_rows,
        "rlrrrrrrrrr",
    )
    peak = []
    for name in ("direct", "bare", "gateway"):
        mine = [r for r in rows if r["path"] == name]
        if mine:
            best = max(mine, key=lambda r: r["rps"])
            peak.append([LABELS[name], f"{best['rps']:,.0f}", best["connections"]])
    peak_table = markdown_table(["path", "max req/s", "at concurrency"], peak, "lrr")
    return (
        f"{settings.duration_s:g} s measured per cell after {settings.warmup_s:g} s of warm-up; "
        f"client: `{client}` (one thread); both Envoys `--concurrency 1`.\n\n"
        + abs_table
        + "\n\nRelative to the direct call and to the bare Envoy:\n\n"
        + rel_table
        + "\n\nPeak throughput (the best of the concurrencies above):\n\n"
        + peak_table
        + "\n"
    )


def run(settings: OverheadSettings) -> SectionResult:
    started = time.monotonic()
    client = "wrk" if wrk_binary() else "python (aiohttp)"
    with tempfile.TemporaryDirectory(prefix="llm-gw-overhead-") as tmp:
        work = Path(tmp)
        upstream, upstream_port = start_upstream(work)
        bare = None
        try:
            listen, admin = free_port(), free_port()
            bare = start_static_envoy(
                work, "envoy-bare", bare_bootstrap(listen, admin, upstream_port), listen, admin
            )
            with local_stack(
                gateway_registry(upstream_port), simulators=False, keep_dir=work / "stack"
            ) as stack:
                gateway = stack.envoys[0]

                async def ready() -> None:
                    async with aiohttp.ClientSession() as session:
                        await wait_routable(session, gateway.url, MODEL)

                asyncio.run(ready())
                targets = {
                    "direct": f"http://127.0.0.1:{upstream_port}{PATH}",
                    "bare": f"{bare.url}{PATH}",
                    "gateway": f"{gateway.url}{PATH}",
                }
                cp = stack.control_plane.pid if stack.control_plane else None
                pids: dict[str, dict[str, int | None]] = {
                    "direct": {"upstream": upstream.pid},
                    "bare": {"upstream": upstream.pid, "envoy": bare.process.pid},
                    "gateway": {"upstream": upstream.pid, "envoy": gateway.process.pid, "control-plane": cp},
                }
                rows = measure(targets, pids, settings)
        finally:
            if bare is not None:
                bare.process.stop()
            upstream.stop()
    markdown = render(rows, settings, client)
    data = {"settings": asdict(settings), "client": client, "body": BODY, "rows": rows}
    return SectionResult("overhead", "Gateway overhead", markdown, data, time.monotonic() - started)
