"""Failover under load: one of three endpoints SIGKILLed mid-run under a steady mix of requests.

A local stack with three simulated vLLM endpoints of one model (registry defaults: health probes every
2 s, 2 failures to go down; retries on connect failure, reset and 503 on another host; outlier ejection
after 2 local-origin failures). Closed-loop clients alternate non-streaming and streaming chat
completions. After a warm-up, ``bench-0`` is killed with SIGKILL (as a crash would) and the load goes on.

Reported: failed requests, separately for non-streaming and streaming, and among the streams those that
were in flight on the killed endpoint (they are expected to break: a response already under way cannot be
retried); when the last error happened; when Envoy's ``/clusters`` first showed the host ejected by
outlier detection and marked unhealthy by the control plane (EDS); when the last attempt reached the dead
host (its request and connect-failure counters stop moving); and Envoy's retry counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from control_plane.devstack.procs import free_port
from loadtest._common import (
    SectionResult,
    envoy_counters,
    local_stack,
    markdown_table,
    percentile,
    wait_routable,
)

MODEL = "fo"
KILLED = f"{MODEL}-0"


@dataclass(frozen=True)
class FailoverSettings:
    clients: int = 16
    warmup_s: float = 4.0
    after_kill_s: float = 14.0
    stream_tokens: int = 64
    plain_tokens: int = 32
    decode_ms: float = 10.0
    max_requests: int = 50_000


@dataclass
class Outcome:
    kind: str  # "stream" or "plain"
    started: float
    finished: float = math.nan
    status: int = 0
    ok: bool = False
    endpoint: str = ""
    chunks: int = 0
    error: str = ""


async def one(
    session: aiohttp.ClientSession, url: str, kind: str, index: int, settings: FailoverSettings
) -> Outcome:
    stream = kind == "stream"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {index}"}],
        "max_tokens": settings.stream_tokens if stream else settings.plain_tokens,
        "stream": stream,
        "seed": index,
    }
    out = Outcome(kind, time.monotonic())
    try:
        async with asyncio.timeout(30), session.post(url, json=body) as response:
            out.status = response.status
            out.endpoint = response.headers.get("x-served-by-endpoint", "")
            if response.status != 200:
                out.error = f"HTTP {response.status}: {(await response.text())[:120]}"
            elif stream:
                done = False
                async for raw in response.content:
                    if raw.startswith(b"data:"):
                        if raw[5:].strip() == b"[DONE]":
                            done = True
                            break
                        out.chunks += 1
                out.ok = done
                if not done:
                    out.error = "stream cut (no [DONE])"
            else:
                doc = json.loads(await response.read())
                out.ok = bool(doc.get("choices"))
                if not out.ok:
                    out.error = "no choices"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:160]
    out.finished = time.monotonic()
    return out


def _host_flags(clusters_json: dict[str, Any], port: int) -> dict[str, Any]:
    for cluster in clusters_json.get("cluster_statuses", []):
        if cluster.get("name") != f"model_{MODEL}":
            continue
        for host in cluster.get("host_statuses", []):
            if host.get("address", {}).get("socket_address", {}).get("port_value") == port:
                stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                return {"health": host.get("health_status", {}), "stats": stats}
    return {}


async def watch_envoy(
    session: aiohttp.ClientSession, admin_url: str, port: int, stop_at: float, samples: list[dict[str, Any]]
) -> None:
    """Every 50 ms: the killed host's health flags and counters in Envoy's /clusters."""
    while time.monotonic() < stop_at:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(f"{admin_url}/clusters?format=json") as response:
                doc = await response.json(content_type=None)
            samples.append({"t": time.monotonic(), **_host_flags(doc, port)})
        await asyncio.sleep(0.05)


@dataclass
class FailoverRun:
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    kill_at: float = math.nan
    end_at: float = math.nan
    counters_before: dict[str, int] = field(default_factory=dict)
    counters_after: dict[str, int] = field(default_factory=dict)


def registry_doc(ports: list[int]) -> dict[str, Any]:
    return {
        "gateway": {"expose_upstream_host": True},
        "models": [
            {
                "id": MODEL,
                "engine": "vllm",
                "endpoints": [
                    {"id": f"{MODEL}-{i}", "url": f"http://127.0.0.1:{p}"} for i, p in enumerate(ports)
                ],
            }
        ],
    }


def run(settings: FailoverSettings) -> SectionResult:
    started = time.monotonic()
    ports = [free_port() for _ in range(3)]
    sim_args = [
        "--decode-ms-per-token",
        f"{settings.decode_ms:g}",
        "--prefill-base-ms",
        "5",
        "--max-batch",
        "64",
    ]
    extra = {f"{MODEL}-{i}": sim_args for i in range(3)}
    result = FailoverRun()
    with local_stack(registry_doc(ports), sim_profile="default", sim_extra_args=extra) as stack:
        envoy = stack.envoys[0]
        url = f"{envoy.url}/v1/chat/completions"

        async def drive() -> None:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            ) as session:
                await wait_routable(session, envoy.url, MODEL)
                # Every endpoint healthy and routable before the load starts.
                await asyncio.sleep(0.5)
                t0 = time.monotonic()
                result.kill_at = t0 + settings.warmup_s
                result.end_at = result.kill_at + settings.after_kill_s
                counter = itertools.count()
                watcher = asyncio.create_task(
                    watch_envoy(session, envoy.admin_url, ports[0], result.end_at, result.samples)
                )

                async def client() -> None:
                    while time.monotonic() < result.end_at:
                        index = next(counter)
                        if index >= settings.max_requests:
                            return
                        kind = "stream" if index % 2 else "plain"
                        result.outcomes.append(await one(session, url, kind, index, settings))

                async def killer() -> None:
                    await asyncio.sleep(max(0.0, result.kill_at - time.monotonic()))
                    result.counters_before = await asyncio.to_thread(
                        envoy_counters, envoy.admin_url, f"model_{MODEL}"
                    )
                    result.kill_at = time.monotonic()
                    stack.simulators[KILLED].kill()

                await asyncio.gather(killer(), *(client() for _ in range(settings.clients)))
                await watcher
                result.counters_after = await asyncio.to_thread(
                    envoy_counters, envoy.admin_url, f"model_{MODEL}"
                )

        asyncio.run(drive())
    summary = summarize(result, settings)
    markdown = render(summary, settings)
    return SectionResult(
        "failover",
        "Failover under load",
        markdown,
        {"settings": asdict(settings), "summary": summary},
        time.monotonic() - started,
    )


def summarize(run_: FailoverRun, settings: FailoverSettings) -> dict[str, Any]:
    kill = run_.kill_at
    outs = run_.outcomes
    before = [o for o in outs if o.finished < kill]
    spanning = [o for o in outs if o.started < kill <= o.finished]
    after = [o for o in outs if o.started >= kill]
    in_flight_killed = [o for o in spanning if o.endpoint == KILLED]
    failures = [o for o in outs if not o.ok and o.finished >= kill]
    expected = [o for o in failures if o in in_flight_killed and o.kind == "stream"]
    unexpected = [o for o in failures if o not in expected]
    last_error = max((o.finished for o in unexpected), default=math.nan)
    last_any_error = max((o.finished for o in failures), default=math.nan)

    def first_time(predicate: Any) -> float:
        for sample in run_.samples:
            if sample["t"] >= kill and predicate(sample):
                return float(sample["t"] - kill)
        return math.nan

    def flags(sample: dict[str, Any]) -> dict[str, Any]:
        health: dict[str, Any] = sample.get("health", {})
        return health

    ejected_s = first_time(lambda s: bool(flags(s).get("failed_outlier_check")))
    eds_unhealthy_s = first_time(lambda s: flags(s).get("eds_health_status") == "UNHEALTHY")
    # The dead host's counters: the last sample where they moved is the last attempt sent to it.
    last_attempt_s = math.nan
    previous: tuple[int, int] | None = None
    for sample in run_.samples:
        stats = sample.get("stats", {})
        current = (stats.get("rq_total", 0), stats.get("cx_connect_fail", 0))
        if previous is not None and current != previous and sample["t"] >= kill:
            last_attempt_s = sample["t"] - kill
        previous = current
    served_after = Counter(o.endpoint for o in after if o.ok)

    def rate(items: list[Outcome], start: float, end: float) -> float:
        return (
            sum(1 for o in items if o.ok and start <= o.finished < end) / (end - start)
            if end > start
            else math.nan
        )

    counters = {
        k.removeprefix(f"cluster.model_{MODEL}."): run_.counters_after.get(k, 0)
        - run_.counters_before.get(k, 0)
        for k in run_.counters_after
        if any(
            k.endswith(s)
            for s in (
                ".upstream_rq_retry",
                ".upstream_rq_retry_success",
                ".upstream_cx_connect_fail",
                ".upstream_rq_pending_failure_eject",
                ".outlier_detection.ejections_enforced_total",
                ".upstream_rq_rx_reset",
                ".upstream_cx_destroy_remote_with_active_rq",
                ".upstream_rq_retry_overflow",
                ".retry_or_shadow_abandoned",
            )
        )
    }
    per_kind = {}
    for kind in ("plain", "stream"):
        mine = [o for o in outs if o.kind == kind]
        after_kill = [o for o in mine if o.finished >= kill]
        failed = [o for o in after_kill if not o.ok]
        per_kind[kind] = {
            "requests_total": len(mine),
            "requests_finishing_after_kill": len(after_kill),
            "failed": len(failed),
            "failed_in_flight_on_killed": sum(1 for o in failed if o in in_flight_killed),
            "failed_other": sum(1 for o in failed if o not in in_flight_killed),
            "in_flight_on_killed_at_kill": sum(1 for o in in_flight_killed if o.kind == kind),
            "in_flight_at_kill": sum(1 for o in spanning if o.kind == kind),
            "errors": dict(Counter(o.error for o in failed).most_common(4)),
        }
    latencies_after = [o.finished - o.started for o in after if o.ok and o.kind == "plain"]
    latencies_before = [o.finished - o.started for o in before if o.ok and o.kind == "plain"]
    return {
        "per_kind": per_kind,
        "failed_before_kill": sum(1 for o in before if not o.ok),
        "unexpected_failures": len(unexpected),
        "last_unexpected_error_s": last_error - kill if math.isfinite(last_error) else math.nan,
        "last_error_s": last_any_error - kill if math.isfinite(last_any_error) else math.nan,
        "outlier_ejected_s": ejected_s,
        "eds_unhealthy_s": eds_unhealthy_s,
        "last_attempt_on_killed_s": last_attempt_s,
        "served_after_kill": dict(served_after),
        "ok_rps_before": rate(outs, kill - settings.warmup_s + 1, kill),
        "ok_rps_after": rate(outs, kill, run_.end_at),
        "plain_p50_before_ms": percentile(latencies_before, 50) * 1000,
        "plain_p50_after_ms": percentile(latencies_after, 50) * 1000,
        "plain_p99_after_ms": percentile(latencies_after, 99) * 1000,
        "envoy_counters_delta": counters,
    }


def _s(value: float) -> str:
    return "never" if not math.isfinite(value) else f"{value:.2f} s"


def render(s: dict[str, Any], settings: FailoverSettings) -> str:
    p, st = s["per_kind"]["plain"], s["per_kind"]["stream"]
    c = s["envoy_counters_delta"]
    # A non-streaming request cut on the killed endpoint is retried elsewhere: the client sees the
    # survivor's name. Envoy counts every upstream connection lost with a request on it; the streams the
    # client saw cut on the killed endpoint are the rest.
    lost = c.get("upstream_cx_destroy_remote_with_active_rq", 0)
    plain_on_killed = max(0, lost - st["failed_in_flight_on_killed"])
    rows = [
        ["requests (whole run)", p["requests_total"], st["requests_total"]],
        ["in flight at the kill (all endpoints)", p["in_flight_at_kill"], st["in_flight_at_kill"]],
        [
            "… of which on the killed endpoint",
            f"{plain_on_killed} (Envoy's counters)",
            st["in_flight_on_killed_at_kill"],
        ],
        ["**failed** (finished after the kill)", f"**{p['failed']}**", f"**{st['failed']}**"],
        [
            "… in flight on the killed endpoint",
            p["failed_in_flight_on_killed"],
            st["failed_in_flight_on_killed"],
        ],
        ["… any other", p["failed_other"], st["failed_other"]],
    ]
    table = markdown_table(["", "non-streaming", "streaming"], rows)
    timeline = markdown_table(
        ["after the SIGKILL", "time"],
        [
            ["last failed request (any)", _s(s["last_error_s"])],
            ["last failed request not explained by a cut stream", _s(s["last_unexpected_error_s"])],
            ["Envoy: host ejected by outlier detection", _s(s["outlier_ejected_s"])],
            ["Envoy: host UNHEALTHY from the control plane (EDS)", _s(s["eds_unhealthy_s"])],
            [
                "Envoy: last request or connection attempt to the dead host",
                _s(s["last_attempt_on_killed_s"]).replace("never", "none after the kill"),
            ],
        ],
        "lr",
    )
    served = ", ".join(f"{k or '?'}: {v}" for k, v in sorted(s["served_after_kill"].items()))
    return (
        f"Three simulated vLLM endpoints (decode {settings.decode_ms:g} ms/token), {settings.clients} "
        f"closed-loop clients alternating non-streaming (`max_tokens` {settings.plain_tokens}) and streaming "
        f"(`max_tokens` {settings.stream_tokens}) chat completions; `{KILLED}` SIGKILLed after "
        f"{settings.warmup_s:g} s, then {settings.after_kill_s:g} s more. Registry defaults for health, "
        "retries and outlier detection.\n\n"
        + table
        + "\n\n"
        + timeline
        + "\n\n"
        + f"Successful requests/s: {s['ok_rps_before']:.0f} before the kill, {s['ok_rps_after']:.0f} after "
        f"(two endpoints left). Non-streaming p50 latency {s['plain_p50_before_ms']:.0f} ms before, "
        f"{s['plain_p50_after_ms']:.0f} ms after (p99 after: {s['plain_p99_after_ms']:.0f} ms). Requests "
        f"started after the kill were served by: {served}. Envoy's counters over the kill: "
        f"{c.get('upstream_rq_retry', 0)} retries ({c.get('upstream_rq_retry_success', 0)} succeeded), "
        f"{c.get('upstream_cx_connect_fail', 0)} connect failures, "
        f"{c.get('upstream_cx_destroy_remote_with_active_rq', 0)} upstream connections lost with a request "
        f"on them, {c.get('outlier_detection.ejections_enforced_total', 0)} outlier ejections, "
        f"{c.get('upstream_rq_retry_overflow', 0)} retries refused by the budget.\n"
    )
