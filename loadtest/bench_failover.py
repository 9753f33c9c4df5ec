"""Failover under load: one of two replicas SIGKILLed, then one of two SIGSTOPped (hung), under 64
closed-loop clients; then overloaded fleets, where retries must not multiply load.

A local stack with two simulated vLLM endpoints per model (registry defaults: health probes every 2 s,
2 failures to go down; retries on connect failure and reset on another replica, the retry budget sized for
a whole replica's share; outlier ejection after 2 local-origin failures). Closed-loop clients alternate
non-streaming and streaming chat completions; about 32 requests are in flight on each replica. After a
warm-up, the victim is killed with SIGKILL (as a crash would), or stopped with SIGSTOP (a hang: its
connections stay open and nothing answers; the model's ``idle_timeout_s`` is 5 s here), and the load goes
on.

Reported for each: failed requests, separately for non-streaming and streaming, and among the streams
those that were in flight on the victim (they are expected to break: a response already under way cannot
be retried); when the last error happened; when Envoy's ``/clusters`` first showed the host ejected by
outlier detection and marked unhealthy by the control plane (EDS); when the last attempt reached the
victim; and Envoy's retry counters. The overload half is ``loadtest.bench_failover_overload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import signal
import time
import urllib.request
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
from loadtest.bench_failover_overload import render_overload, run_overload

MODEL = "fo"


@dataclass(frozen=True)
class FailoverSettings:
    clients: int = 64
    warmup_s: float = 4.0
    after_kill_s: float = 14.0
    hang_idle_timeout_s: float = 5.0
    stream_tokens: int = 64
    plain_tokens: int = 32
    decode_ms: float = 10.0
    max_requests: int = 50_000
    overload_s: float = 6.0


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
    session: aiohttp.ClientSession, url: str, model: str, kind: str, index: int, settings: FailoverSettings
) -> Outcome:
    stream = kind == "stream"
    body = {
        "model": model,
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


def _host_flags(clusters_json: dict[str, Any], cluster_id: str, port: int) -> dict[str, Any]:
    for cluster in clusters_json.get("cluster_statuses", []):
        if cluster.get("name") != cluster_id:
            continue
        for host in cluster.get("host_statuses", []):
            if host.get("address", {}).get("socket_address", {}).get("port_value") == port:
                stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                return {"health": host.get("health_status", {}), "stats": stats}
    return {}


async def watch_envoy(
    session: aiohttp.ClientSession,
    admin_url: str,
    cluster_id: str,
    port: int,
    stop_at: float,
    samples: list[dict[str, Any]],
) -> None:
    """Every 50 ms: the victim's health flags and counters in Envoy's /clusters."""
    while time.monotonic() < stop_at:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(f"{admin_url}/clusters?format=json") as response:
                doc = await response.json(content_type=None)
            samples.append({"t": time.monotonic(), **_host_flags(doc, cluster_id, port)})
        await asyncio.sleep(0.05)


@dataclass
class FailoverRun:
    scenario: str  # "kill" or "hang"
    model: str
    victim_in_flight: int = 0  # requests the victim held (running + queued) just before the signal
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    kill_at: float = math.nan
    end_at: float = math.nan
    counters_before: dict[str, int] = field(default_factory=dict)
    counters_after: dict[str, int] = field(default_factory=dict)


SCENARIOS = {"kill": (MODEL, signal.SIGKILL), "hang": ("hang", signal.SIGSTOP)}


def registry_doc(ports: dict[str, list[int]], settings: FailoverSettings) -> dict[str, Any]:
    def model(name: str, **extra: Any) -> dict[str, Any]:
        endpoints = [{"id": f"{name}-{i}", "url": f"http://127.0.0.1:{p}"} for i, p in enumerate(ports[name])]
        return {"id": name, "engine": "vllm", "endpoints": endpoints, **extra}

    limits = {"idle_timeout_s": settings.hang_idle_timeout_s}
    return {"gateway": {"expose_upstream_host": True}, "models": [model(MODEL), model("hang", limits=limits)]}


def _sim_in_flight(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/state", timeout=5) as response:
        state = json.loads(response.read())
    return int(state["running"]) + int(state["queue"])


def run_scenario(stack: Any, scenario: str, ports: list[int], settings: FailoverSettings) -> FailoverRun:
    model, sig = SCENARIOS[scenario]
    victim = stack.simulators[f"{model}-0"]
    envoy = stack.envoys[0]
    url = f"{envoy.url}/v1/chat/completions"
    result = FailoverRun(scenario, model)
    after_s = settings.after_kill_s

    async def drive() -> None:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            await wait_routable(session, envoy.url, model)
            # Every endpoint healthy and routable before the load starts.
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            result.kill_at = t0 + settings.warmup_s
            result.end_at = result.kill_at + after_s
            counter = itertools.count()
            watcher = asyncio.create_task(
                watch_envoy(
                    session, envoy.admin_url, f"model_{model}", ports[0], result.end_at, result.samples
                )
            )

            async def client() -> None:
                while time.monotonic() < result.end_at:
                    index = next(counter)
                    if index >= settings.max_requests:
                        return
                    kind = "stream" if index % 2 else "plain"
                    result.outcomes.append(await one(session, url, model, kind, index, settings))

            async def strike() -> None:
                await asyncio.sleep(max(0.0, result.kill_at - time.monotonic()))
                result.counters_before = await asyncio.to_thread(
                    envoy_counters, envoy.admin_url, f"model_{model}"
                )
                result.victim_in_flight = await asyncio.to_thread(_sim_in_flight, ports[0])
                result.kill_at = time.monotonic()
                victim.signal(sig)

            await asyncio.gather(strike(), *(client() for _ in range(settings.clients)))
            await watcher
            result.counters_after = await asyncio.to_thread(envoy_counters, envoy.admin_url, f"model_{model}")

    try:
        asyncio.run(drive())
    finally:
        victim.signal(signal.SIGCONT)  # a stopped process cannot be stopped
    return result


def run(settings: FailoverSettings) -> SectionResult:
    started = time.monotonic()
    ports = {model: [free_port(), free_port()] for model, _ in SCENARIOS.values()}
    sim_args = [
        "--decode-ms-per-token",
        f"{settings.decode_ms:g}",
        "--prefill-base-ms",
        "5",
        "--max-batch",
        "64",
    ]
    extra = {f"{model}-{i}": sim_args for model in ports for i in range(2)}
    summaries = {}
    with local_stack(registry_doc(ports, settings), sim_profile="default", sim_extra_args=extra) as stack:
        for scenario, (model, _) in SCENARIOS.items():
            summaries[scenario] = summarize(run_scenario(stack, scenario, ports[model], settings), settings)
    overload = run_overload(settings.clients, settings.overload_s)
    markdown = "\n".join(render(summaries[s], s, settings) for s in SCENARIOS)
    markdown += "\n" + render_overload(overload, settings.clients, settings.overload_s)
    return SectionResult(
        "failover",
        "Failover under load",
        markdown,
        {"settings": asdict(settings), "summary": summaries, "overload": [asdict(r) for r in overload]},
        time.monotonic() - started,
    )


def summarize(run_: FailoverRun, settings: FailoverSettings) -> dict[str, Any]:
    kill = run_.kill_at
    outs = run_.outcomes
    before = [o for o in outs if o.finished < kill]
    spanning = [o for o in outs if o.started < kill <= o.finished]
    after = [o for o in outs if o.started >= kill]
    victim = f"{run_.model}-0"
    in_flight_killed = [o for o in spanning if o.endpoint == victim]
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
        k.removeprefix(f"cluster.model_{run_.model}."): run_.counters_after.get(k, 0)
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
                ".upstream_rq_per_try_idle_timeout",
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
        "scenario": run_.scenario,
        "victim": victim,
        "victim_in_flight": run_.victim_in_flight,
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


def render(s: dict[str, Any], scenario: str, settings: FailoverSettings) -> str:
    p, st = s["per_kind"]["plain"], s["per_kind"]["stream"]
    c = s["envoy_counters_delta"]
    hang = scenario == "hang"
    event = "SIGSTOP" if hang else "SIGKILL"
    # A non-streaming request cut on the victim is retried elsewhere: the client sees the survivor's
    # name. The victim's own count of what it held just before the signal, less the streams the client
    # saw cut on it, is the non-streaming share.
    plain_on_victim = max(0, s["victim_in_flight"] - st["in_flight_on_killed_at_kill"])
    rows = [
        ["requests (whole run)", p["requests_total"], st["requests_total"]],
        [f"in flight at the {event} (all endpoints)", p["in_flight_at_kill"], st["in_flight_at_kill"]],
        [
            f"… of which on `{s['victim']}`",
            f"{plain_on_victim} (its own count)",
            st["in_flight_on_killed_at_kill"],
        ],
        [f"**failed** (finished after the {event})", f"**{p['failed']}**", f"**{st['failed']}**"],
        [
            f"… in flight on `{s['victim']}`",
            p["failed_in_flight_on_killed"],
            st["failed_in_flight_on_killed"],
        ],
        ["… any other", p["failed_other"], st["failed_other"]],
    ]
    table = markdown_table(["", "non-streaming", "streaming"], rows)
    timeline = markdown_table(
        [f"after the {event}", "time"],
        [
            ["last failed request (any)", _s(s["last_error_s"])],
            ["last failed request not explained by a cut stream", _s(s["last_unexpected_error_s"])],
            ["Envoy: host ejected by outlier detection", _s(s["outlier_ejected_s"])],
            ["Envoy: host UNHEALTHY from the control plane (EDS)", _s(s["eds_unhealthy_s"])],
            [
                "Envoy: last request or connection attempt to the victim",
                _s(s["last_attempt_on_killed_s"]).replace("never", f"none after the {event}"),
            ],
        ],
        "lr",
    )
    served = ", ".join(f"{k or '?'}: {v}" for k, v in sorted(s["served_after_kill"].items()))
    what = (
        f"`{s['victim']}` SIGSTOPped (hung; the model's `idle_timeout_s` is "
        f"{settings.hang_idle_timeout_s:g} s)"
        if hang
        else f"`{s['victim']}` SIGKILLed"
    )
    return (
        f"**{event}.** Two simulated vLLM endpoints (decode {settings.decode_ms:g} ms/token), "
        f"{settings.clients} closed-loop clients alternating non-streaming (`max_tokens` "
        f"{settings.plain_tokens}) and streaming (`max_tokens` {settings.stream_tokens}) chat completions; "
        f"{what} after {settings.warmup_s:g} s, then {settings.after_kill_s:g} s more. Registry defaults "
        "for health, retries and outlier detection.\n\n"
        + table
        + "\n\n"
        + timeline
        + "\n\n"
        + f"Successful requests/s: {s['ok_rps_before']:.0f} before, {s['ok_rps_after']:.0f} after (one "
        f"endpoint left). Non-streaming p50 latency {s['plain_p50_before_ms']:.0f} ms before, "
        f"{s['plain_p50_after_ms']:.0f} ms after (p99 after: {s['plain_p99_after_ms']:.0f} ms). Requests "
        f"started after the {event} were served by: {served}. Envoy's counters over it: "
        f"{c.get('upstream_rq_retry', 0)} retries ({c.get('upstream_rq_retry_success', 0)} succeeded), "
        f"{c.get('upstream_rq_retry_overflow', 0)} refused by the retry budget, "
        f"{c.get('upstream_rq_per_try_idle_timeout', 0)} tries cut by the per-try idle timeout, "
        f"{c.get('upstream_cx_connect_fail', 0)} connect failures, "
        f"{c.get('upstream_cx_destroy_remote_with_active_rq', 0)} upstream connections lost with a request "
        f"on them, {c.get('outlier_detection.ejections_enforced_total', 0)} outlier ejections.\n"
    )
