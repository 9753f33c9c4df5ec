"""Config convergence: from a change to Envoy applying it.

A local stack (control plane process, one Envoy, two simulated endpoints of one model).

- **Admin drain / undrain** of one endpoint, alternately, many times: the time the admin call takes (it
  returns once every Envoy has ACKed), and the time from the call until Envoy's own ``/clusters`` shows the
  endpoint's EDS health as ``DRAINING`` (or back to healthy), polled back to back while the call runs.
- **Health flips**: the endpoint's server SIGKILLed, then the time until Envoy shows it ``UNHEALTHY``;
  split into the control plane's detection (its "is now unhealthy" log line: the probe schedule) and the
  push (from that line to Envoy). Then the server restarted and the time until Envoy shows it healthy again.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import aiohttp

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack
from loadtest._common import (
    SectionResult,
    admin_headers,
    fmt_ms,
    local_stack,
    markdown_table,
    percentile,
    wait_routable,
)

MODEL = "cv"
TARGET = f"{MODEL}-0"


@dataclass(frozen=True)
class ConvergenceSettings:
    admin_changes: int = 50
    health_flips: int = 8
    seed: int = 7
    time_budget_s: float = 120.0


def registry_doc(ports: list[int]) -> dict[str, Any]:
    return {
        "models": [
            {
                "id": MODEL,
                "engine": "vllm",
                "endpoints": [
                    {"id": f"{MODEL}-{i}", "url": f"http://127.0.0.1:{p}"} for i, p in enumerate(ports)
                ],
            }
        ]
    }


async def eds_status(session: aiohttp.ClientSession, admin_url: str, port: int) -> str:
    """The target host's EDS health in Envoy (``HEALTHY``, ``UNHEALTHY``, ``DRAINING``, ``UNKNOWN``)."""
    async with session.get(f"{admin_url}/clusters?format=json") as response:
        doc = await response.json(content_type=None)
    for cluster in doc.get("cluster_statuses", []):
        if cluster.get("name") != f"model_{MODEL}":
            continue
        for host in cluster.get("host_statuses", []):
            if host.get("address", {}).get("socket_address", {}).get("port_value") == port:
                return str(host.get("health_status", {}).get("eds_health_status", "UNKNOWN"))
    return "ABSENT"


async def wait_status(
    session: aiohttp.ClientSession,
    admin_url: str,
    port: int,
    wanted: set[str],
    timeout_s: float,
    pause_s: float,
) -> float:
    """perf_counter() time at which Envoy first showed one of ``wanted``; NaN on timeout."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if await eds_status(session, admin_url, port) in wanted:
            return time.perf_counter()
        if pause_s:
            await asyncio.sleep(pause_s)
    return math.nan


async def admin_changes(
    stack: LocalStack, port: int, settings: ConvergenceSettings, deadline: float
) -> list[dict[str, Any]]:
    envoy = stack.envoys[0]
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await wait_routable(session, envoy.url, MODEL)
        # Start from a known state: probed healthy.
        await wait_status(session, envoy.admin_url, port, {"HEALTHY"}, 15, 0.05)
        for i in range(settings.admin_changes):
            if time.monotonic() > deadline:
                break
            action = "drain" if i % 2 == 0 else "undrain"
            wanted = {"DRAINING"} if action == "drain" else {"HEALTHY", "UNKNOWN"}
            t0 = time.perf_counter()
            poller = asyncio.create_task(wait_status(session, envoy.admin_url, port, wanted, 10, 0))
            async with session.post(
                f"{stack.admin_url}/admin/endpoints/{TARGET}/{action}", headers=admin_headers(stack)
            ) as response:
                await response.read()
                status = response.status
            t_api = time.perf_counter()
            t_visible = await poller
            rows.append(
                {
                    "action": action,
                    "status": status,
                    "api_ms": (t_api - t0) * 1000,
                    "visible_ms": (t_visible - t0) * 1000,
                }
            )
    return rows


_LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) WARNING control_plane\.health\.prober: endpoint "
    + re.escape(TARGET)
    + r" of \S+ is now (\w+)",
    re.MULTILINE,
)


def _log_times(stack: LocalStack, state: str, after_wall: float) -> float:
    """Wall time of the first control-plane log line after ``after_wall`` saying the target is ``state``."""
    assert stack.control_plane is not None
    for match in _LOG_LINE.finditer(stack.control_plane.log_text()):
        if match.group(2) != state:
            continue
        # logging's asctime is local time with milliseconds.
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if stamp >= after_wall - 0.002:
            return stamp
    return math.nan


async def health_flips(
    stack: LocalStack, port: int, settings: ConvergenceSettings, deadline: float
) -> list[dict[str, Any]]:
    envoy = stack.envoys[0]
    registry = stack.registry()
    model = registry.models[0]
    check = model.health or registry.health
    probe_cycle_s = check.interval_s * (1 + check.jitter)
    rng = random.Random(settings.seed)
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await wait_status(session, envoy.admin_url, port, {"HEALTHY"}, 15, 0.05)
        for _ in range(settings.health_flips):
            if time.monotonic() > deadline:
                break
            # Envoy shows a change just after a probe: a random pause puts the kill (and the restart below)
            # at a random point of the probe cycle, as a real failure would be.
            await asyncio.sleep(rng.uniform(0, probe_cycle_s))
            kill_wall, t0 = time.time(), time.perf_counter()
            stack.simulators[TARGET].kill()
            t_down = await wait_status(session, envoy.admin_url, port, {"UNHEALTHY"}, 15, 0.01)
            logged_down = _log_times(stack, "unhealthy", kill_wall)
            down_visible_wall = kill_wall + (t_down - t0)
            await asyncio.sleep(rng.uniform(0, probe_cycle_s))
            await asyncio.to_thread(stack.start_simulator, model, 0)  # same port, waits for READY
            ready_wall, t1 = time.time(), time.perf_counter()
            t_up = await wait_status(session, envoy.admin_url, port, {"HEALTHY"}, 15, 0.01)
            logged_up = _log_times(stack, "healthy", ready_wall)
            rows.append(
                {
                    "kill_to_unhealthy_ms": (t_down - t0) * 1000,
                    "kill_to_detected_ms": (logged_down - kill_wall) * 1000,
                    "detected_to_envoy_ms": (down_visible_wall - logged_down) * 1000,
                    "ready_to_healthy_ms": (t_up - t1) * 1000,
                    "ready_to_detected_ms": (logged_up - ready_wall) * 1000,
                    "detected_to_envoy_up_ms": (ready_wall + (t_up - t1) - logged_up) * 1000,
                }
            )
    return rows


def _stats(values: list[float]) -> tuple[str, str, str, str]:
    finite = [v for v in values if math.isfinite(v)]
    return (
        fmt_ms(percentile(finite, 50)),
        fmt_ms(percentile(finite, 99)),
        fmt_ms(max(finite, default=math.nan)),
        f"{len(finite)}/{len(values)}",
    )


def render(admin: list[dict[str, Any]], flips: list[dict[str, Any]]) -> str:
    rows = []
    for action in ("drain", "undrain"):
        mine = [r for r in admin if r["action"] == action]
        rows.append(
            [f"admin `{action}`: call returns (all Envoys ACKed)", *_stats([r["api_ms"] for r in mine])]
        )
        rows.append(
            [f"admin `{action}`: Envoy's `/clusters` shows it", *_stats([r["visible_ms"] for r in mine])]
        )
    for label, key in (
        ("SIGKILL → Envoy shows UNHEALTHY", "kill_to_unhealthy_ms"),
        ("… SIGKILL → control plane detects it (probes)", "kill_to_detected_ms"),
        ("… detected → Envoy shows it (push)", "detected_to_envoy_ms"),
        ("restarted (READY) → Envoy shows HEALTHY", "ready_to_healthy_ms"),
        ("… READY → control plane detects it", "ready_to_detected_ms"),
        ("… detected → Envoy shows it (push)", "detected_to_envoy_up_ms"),
    ):
        rows.append([label, *_stats([r[key] for r in flips])])
    return (
        "Times from the change; `/clusters` polled back to back (admin changes) or every 10 ms (health). "
        "Health settings are the registry defaults (probe every 2 s ± 10 %, 2 failures to go down, 1 success "
        "to come back); each kill and restart comes after a random pause (0 to 2.2 s, seeded), so it falls "
        "at a random point of the probe cycle. Control-plane log times have millisecond resolution.\n\n"
        + markdown_table(["change", "p50", "p99", "max", "samples"], rows)
        + "\n"
    )


def run(settings: ConvergenceSettings) -> SectionResult:
    started = time.monotonic()
    deadline = started + settings.time_budget_s
    ports = [free_port() for _ in range(2)]
    with local_stack(registry_doc(ports), sim_profile="instant") as stack:
        admin = asyncio.run(admin_changes(stack, ports[0], settings, deadline))
        flips = asyncio.run(health_flips(stack, ports[0], settings, deadline))
    markdown = render(admin, flips)
    data = {"settings": asdict(settings), "admin_changes": admin, "health_flips": flips}
    return SectionResult("convergence", "Config convergence", markdown, data, time.monotonic() - started)
