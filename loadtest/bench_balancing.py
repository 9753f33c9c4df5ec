"""Benchmark: round robin vs least-request vs least-request with telemetry weights, one slow replica.

Each policy gets a fresh local stack (simulated model servers, control plane, Envoy; the code of
``make run``) in the same run, with one endpoint ``--slowdown`` times slower than the others, and the
same offered load: ``--concurrency`` closed-loop clients (or a Poisson ``--rate``) sending streaming
OpenAI chat completions with a seeded distribution of prompts and ``max_tokens``. After ``--warmup``
seconds, requests that start within the next ``--duration`` seconds are measured (and awaited to the
end); throughput counts the successful requests that finished inside that window.

    python -m loadtest.bench_balancing [--duration 25] [--concurrency 16] [--endpoints 2] [--out FILE]

Prints a markdown report (tables of absolute figures and of ratios vs round robin) and writes every
figure, with the per-second weights and server queues, as JSON under ``loadtest/results/`` (git-ignored).
A benchmark, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack
from loadtest._common import (
    RESULTS_DIR,
    CpuMeter,
    StreamResult,
    admin_headers,
    local_stack,
    machine_info,
    percentile,
    ratio,
    stack_processes,
    stream_chat,
    wait_routable,
)

MODEL = "bench"
_WORDS = (
    *("gateway", "envoy", "model", "token", "stream", "latency", "replica", "batch", "queue", "prompt"),
    *("answer", "cluster", "weight", "request", "server", "decode", "prefill", "cache", "memory"),
    *("route", "policy", "signal", "scrape", "control", "plane", "client"),
)


LEAST_REQUEST_TYPE = (
    "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
)


@dataclass(frozen=True)
class Policy:
    key: str
    label: str
    model_fields: Mapping[str, Any]  # registry fields of the model (load_balancing, cluster_overrides)
    telemetry: Mapping[str, Any]


def policies(scrape_interval_s: float) -> list[Policy]:
    """The three compared policies, then optional variants (``--policies``). All scrape at the same interval,
    so the control plane's cost is the same and only the use of the signals differs."""
    return [
        Policy(
            "rr",
            "round robin",
            {"load_balancing": "round_robin"},
            {"policy": "none", "interval_s": scrape_interval_s},
        ),
        Policy("lr", "least request", {}, {"policy": "none", "interval_s": scrape_interval_s}),
        Policy(
            "lr+tw",
            "least request + telemetry weights",
            {},
            {"policy": "telemetry", "interval_s": scrape_interval_s, "min_push_interval_s": 1},
        ),
        # Not run by default: Envoy's stock least request, two random choices drawn with replacement (the
        # gateway's least request compares every replica, since model replicas are few).
        Policy(
            "lr-p2c",
            "least request, two random choices",
            {
                "cluster_overrides": {
                    "load_balancing_policy": {
                        "policies": [
                            {
                                "typed_extension_config": {
                                    "name": "envoy.load_balancing_policies.least_request",
                                    "typed_config": {
                                        "@type": LEAST_REQUEST_TYPE,
                                        "choice_count": 2,
                                    },
                                }
                            }
                        ]
                    }
                }
            },
            {"policy": "none", "interval_s": scrape_interval_s},
        ),
    ]


# ------------------------------------------------------------------ workload
@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str
    max_tokens: int


def make_workload(seed: int, count: int, min_tokens: int, max_tokens: int) -> list[RequestSpec]:
    """The same seeded sequence of requests for every policy: prompts of 20-200 words (~25-250 tokens),
    ``max_tokens`` uniform in [min_tokens, max_tokens]."""
    rng = random.Random(seed)
    return [
        RequestSpec(
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 200))),
            rng.randint(min_tokens, max_tokens),
        )
        for _ in range(count)
    ]


def request_body(spec: RequestSpec, index: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def registry_doc(policy: Policy, ports: Sequence[int], engine: str) -> dict[str, Any]:
    return {
        "gateway": {"expose_upstream_host": True},
        "telemetry": dict(policy.telemetry),
        "models": [
            {
                "id": MODEL,
                "engine": engine,
                "endpoints": [
                    {"id": f"{MODEL}-{i}", "url": f"http://127.0.0.1:{port}"} for i, port in enumerate(ports)
                ],
                **dict(policy.model_fields),
            }
        ],
    }


# ------------------------------------------------------------------ one policy
@dataclass
class PolicyRun:
    policy: Policy
    results: list[StreamResult] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Once a second: weights the control plane pushed, and each simulator's running / queued."""
    cpu: dict[str, Any] = field(default_factory=dict)
    sim_urls: dict[str, str] = field(default_factory=dict)
    """Endpoint id → the simulator's own base URL (for ``/sim/state``)."""
    sim_state: dict[str, Any] = field(default_factory=dict)
    """Each simulator's ``/sim/state`` after the run (knobs and counters)."""


async def _sampler(
    session: aiohttp.ClientSession, stack: LocalStack, sim_urls: Mapping[str, str], t0: float, stop_at: float
) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    headers = admin_headers(stack)
    while time.monotonic() < stop_at:
        sample: dict[str, Any] = {"t": round(time.monotonic() - t0, 2)}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            async with session.get(f"{stack.admin_url}/admin/models/{MODEL}", headers=headers) as r:
                view = await r.json()
            sample["weights"] = {e["id"]: e["weight"] for e in view["endpoints"]}
        for endpoint_id, url in sim_urls.items():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                async with session.get(f"{url}/sim/state") as r:
                    state = await r.json()
                sample[endpoint_id] = {"running": state["running"], "queue": state["queue"]}
        samples.append(sample)
        await asyncio.sleep(1.0)
    return samples


async def drive(
    base_url: str,
    workload: Sequence[RequestSpec],
    args: argparse.Namespace,
    run: PolicyRun,
    stack: LocalStack,
) -> None:
    sim_urls = run.sim_urls
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
    ) as session:
        await wait_routable(session, base_url, MODEL)
        url = f"{base_url}/v1/chat/completions"
        t0 = time.monotonic()
        window_start = t0 + args.warmup
        window_end = window_start + args.duration
        run.window = (window_start, window_end)
        indices = itertools.count()
        meter = CpuMeter(stack_processes(stack))

        async def measure_cpu() -> None:
            await asyncio.sleep(max(0.0, window_start - time.monotonic()))
            meter.start()
            await asyncio.sleep(max(0.0, window_end - time.monotonic()))
            run.cpu = meter.stop()

        async def one(index: int) -> None:
            run.results.append(
                await stream_chat(session, url, request_body(workload[index], index), args.request_timeout)
            )

        async def closed_loop_client() -> None:
            while time.monotonic() < window_end:
                index = next(indices)
                if index >= len(workload):
                    return
                await one(index)

        async def open_loop() -> None:
            rng = random.Random(args.seed + 1)
            tasks: set[asyncio.Task[None]] = set()
            next_at = time.monotonic()
            while True:
                next_at += rng.expovariate(args.rate)
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                index = next(indices)
                if next_at >= window_end or index >= len(workload):
                    break
                task = asyncio.create_task(one(index))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)

        sampler = asyncio.create_task(_sampler(session, stack, sim_urls, window_start, window_end))
        cpu_task = asyncio.create_task(measure_cpu())
        if args.rate:
            await open_loop()
        else:
            await asyncio.gather(*(closed_loop_client() for _ in range(args.concurrency)))
        await cpu_task
        run.samples = await sampler
        for endpoint_id, sim_url in sim_urls.items():
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with session.get(f"{sim_url}/sim/state") as r:
                    run.sim_state[endpoint_id] = await r.json()


def run_policy(policy: Policy, workload: Sequence[RequestSpec], args: argparse.Namespace) -> PolicyRun:
    ports = [free_port() for _ in range(args.endpoints)]
    endpoint_ids = [f"{MODEL}-{i}" for i in range(args.endpoints)]
    sim_args = ["--max-batch", str(args.max_batch)]
    if args.decode_ms_per_token is not None:
        sim_args += ["--decode-ms-per-token", str(args.decode_ms_per_token)]
    extra = {
        endpoint_id: sim_args + (["--slowdown", str(args.slowdown)] if i == 0 else [])
        for i, endpoint_id in enumerate(endpoint_ids)
    }
    run = PolicyRun(
        policy, sim_urls={e: f"http://127.0.0.1:{port}" for e, port in zip(endpoint_ids, ports, strict=True)}
    )
    doc = registry_doc(policy, ports, args.engine)
    print(f"[{policy.key}] starting a stack ({args.endpoints} {args.engine} endpoints)...", file=sys.stderr)
    with local_stack(doc, sim_profile=args.profile, sim_extra_args=extra) as stack:
        print(f"[{policy.key}] load: {args.warmup:g}s warm-up + {args.duration:g}s measured", file=sys.stderr)
        asyncio.run(drive(stack.envoys[0].url, workload, args, run, stack))
    return run


# ------------------------------------------------------------------ summary
def summarize(run: PolicyRun, slow_id: str) -> dict[str, Any]:
    start, end = run.window
    duration = end - start
    measured = [r for r in run.results if start <= r.started < end]
    ok = [r for r in measured if r.ok]
    finished_ok = [r for r in run.results if r.ok and start <= r.finished <= end]
    latencies = [r.latency for r in ok]
    ttfts = [r.ttft for r in ok]
    served = Counter(r.endpoint for r in ok)
    errors = Counter(f"{r.status} {r.error}".strip() for r in measured if not r.ok)
    in_window = [s for s in run.samples if s["t"] >= 0]  # t: seconds since the window started
    in_flight: dict[str, float] = {}
    for endpoint_id in run.sim_urls:
        values = [s[endpoint_id]["running"] + s[endpoint_id]["queue"] for s in in_window if endpoint_id in s]
        in_flight[endpoint_id] = sum(values) / len(values) if values else math.nan
    weights = [s["weights"] for s in in_window if "weights" in s]
    return {
        "policy": run.policy.key,
        "label": run.policy.label,
        "requests": len(measured),
        "errors": len(measured) - len(ok),
        "error_kinds": dict(errors),
        "throughput_rps": len(finished_ok) / duration,
        "output_tokens_per_s": sum(r.completion_tokens for r in finished_ok) / duration,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "slow_share": served[slow_id] / len(ok) if ok else math.nan,
        "served_by": dict(sorted(served.items())),
        "slowdown_by_endpoint": {k: (v or {}).get("slowdown") for k, v in run.sim_state.items()},
        "mean_in_flight_per_endpoint": in_flight,
        "weights_first": weights[0] if weights else None,
        "weights_last": weights[-1] if weights else None,
        "cpu": run.cpu,
        "samples": run.samples,
        "sim_state": run.sim_state,
    }


def _s(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f} s"


def _x(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}x"


def render_markdown(summaries: Sequence[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    machine = meta["machine"]
    settings = meta["settings"]
    load = (
        f"Poisson arrivals at {settings['rate']:g} req/s"
        if settings["rate"]
        else f"{settings['concurrency']} closed-loop streaming clients"
    )
    lines = [
        f"Run {machine['date_utc']} on {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"Python {machine['python']}, Envoy {machine['envoy']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Setup: {settings['endpoints']} simulated {settings['engine']} endpoints (profile "
        f"`{settings['profile']}`, max batch {settings['max_batch']}"
        + (
            f", decode {settings['decode_ms_per_token']:g} ms/token"
            if settings["decode_ms_per_token"] is not None
            else ""
        )
        + f"), `{MODEL}-0` slowed down {settings['slowdown']:g}x; {load}; "
        f"`max_tokens` uniform in [{settings['min_tokens']}, {settings['max_tokens']}], "
        f"seed {settings['seed']}; "
        f"{settings['warmup']:g} s warm-up then {settings['duration']:g} s measured per policy, each on a "
        "fresh stack.",
        "",
        "| policy | requests | errors | req/s | output tok/s | p50 latency | p99 latency | p50 TTFT "
        "| p99 TTFT | slow share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['label']} | {s['requests']} | {s['errors']} | {s['throughput_rps']:.2f} "
            f"| {s['output_tokens_per_s']:.0f} | {_s(s['latency_p50_s'])} | {_s(s['latency_p99_s'])} "
            f"| {_s(s['ttft_p50_s'])} | {_s(s['ttft_p99_s'])} | {s['slow_share']:.1%} |"
        )
    base = next((s for s in summaries if s["policy"] == "rr"), summaries[0])
    lines += [
        "",
        f"Ratios vs {base['label']} (req/s: higher is better; latency and TTFT: lower is better):",
        "",
        "| policy | req/s | p50 latency | p99 latency | p50 TTFT | p99 TTFT | slow share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        cells = [
            _x(ratio(s[key], base[key]))
            for key in (
                "throughput_rps",
                "latency_p50_s",
                "latency_p99_s",
                "ttft_p50_s",
                "ttft_p99_s",
                "slow_share",
            )
        ]
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "During the measured window: mean requests in flight per endpoint (running + queued, sampled from "
        "the simulators once a second), the control plane's weights at the end, and CPU use (cores).",
        "",
        "| policy | in flight (slow / others) | weights at end | host CPU busy | client | Envoy "
        "| simulators | control plane |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        flights = s["mean_in_flight_per_endpoint"]
        slow_id = f"{MODEL}-0"
        others = [v for k, v in flights.items() if k != slow_id]
        weights = s["weights_last"] or {}
        cores = s["cpu"].get("cores_used", {})
        lines.append(
            f"| {s['label']} | {flights.get(slow_id, math.nan):.1f} / "
            + ", ".join(f"{v:.1f}" for v in others)
            + " | "
            + (":".join(str(weights[k]) for k in sorted(weights)) or "n/a")
            + f" | {s['cpu'].get('host_busy_fraction', math.nan):.0%}"
            + f" | {cores.get('client', math.nan):.2f}"
            + f" | {sum(v for k, v in cores.items() if k.startswith('envoy:')):.2f}"
            + f" | {sum(v for k, v in cores.items() if k.startswith('sim:')):.2f}"
            + f" | {cores.get('control-plane', math.nan):.2f} |"
        )
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_balancing",
        description="Compare round robin, least request and least request with telemetry weights on "
        "fresh local stacks with one slow endpoint.",
    )
    p.add_argument("--duration", type=float, default=25.0, help="measured seconds per policy")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop streaming clients")
    p.add_argument(
        "--rate", type=float, default=0.0, help="open loop instead: Poisson arrivals per second (0 = off)"
    )
    p.add_argument("--endpoints", type=int, default=2, help="endpoints of the model (the first is slow)")
    p.add_argument("--slowdown", type=float, default=3.0, help="slowdown of the slow endpoint")
    p.add_argument("--engine", default="vllm", choices=["vllm", "tgi", "sglang"])
    p.add_argument("--profile", default="default", help="simulator latency profile")
    p.add_argument("--max-batch", type=int, default=8, help="simulator batch size")
    p.add_argument("--decode-ms-per-token", type=float, default=None, help="default: the profile's")
    p.add_argument("--min-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-requests", type=int, default=20_000, help="cap on requests per policy")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--scrape-interval", type=float, default=0.5, help="telemetry interval of every stack")
    p.add_argument(
        "--policies",
        default="rr,lr,lr+tw",
        help="comma-separated policies among rr, lr, lr+tw and lr-p2c (run in that order)",
    )
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument(
        "--json", type=Path, help="results file (default: loadtest/results/bench_balancing-*.json)"
    )
    args = p.parse_args(argv)
    if args.endpoints < 2:
        p.error("--endpoints must be at least 2 (one slow, one or more normal)")
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.rate < 0:
        p.error("--concurrency must be >= 1, --duration > 0, --warmup and --rate >= 0")
    if not 1 <= args.min_tokens <= args.max_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = [k.strip() for k in args.policies.split(",") if k.strip()]
    chosen = [p for p in policies(args.scrape_interval) if p.key in wanted]
    unknown = set(wanted) - {p.key for p in chosen}
    if unknown or not chosen:
        print(f"unknown policies: {', '.join(sorted(unknown)) or '(none given)'}", file=sys.stderr)
        return 2
    workload = make_workload(args.seed, args.max_requests, args.min_tokens, args.max_tokens)
    command = "python -m loadtest.bench_balancing" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    started = time.monotonic()
    machine = machine_info()
    summaries = []
    for policy in chosen:
        run = run_policy(policy, workload, args)
        summary = summarize(run, f"{MODEL}-0")
        summaries.append(summary)
        print(
            f"[{policy.key}] {summary['requests']} requests, {summary['errors']} errors, "
            f"{summary['throughput_rps']:.2f} req/s, slow share {summary['slow_share']:.1%}",
            file=sys.stderr,
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "json")}
    meta = {"machine": machine, "command": command, "settings": settings}
    report = render_markdown(summaries, meta)
    print(report)
    print(f"total wall time: {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    path = args.json or RESULTS_DIR / f"bench_balancing-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite({**meta, "policies": summaries}), indent=2, default=str) + "\n")
    print(f"results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
