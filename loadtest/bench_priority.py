"""Priority under overload: a steady high-priority stream while low-priority traffic pushes the replicas
past saturation, with shedding and a reserve for high priority, each alone, and neither.

    python -m loadtest.bench_priority [--quick]

Two simulated vLLM replicas (8 batch slots each, a KV cache that 8 running requests fill; the
model's `max_concurrent_requests` is their 16 slots). Phases, each on a fresh stack:

- ``unloaded``: the high-priority stream alone (its TTFT is the reference);
- ``shedding + reserve 4``: the same stream plus 48 closed-loop low-priority clients that would keep both
  replicas' queues full; the control plane sees the KV cache and queues (telemetry every 0.5 s) and Envoy
  sheds low priority with 503 ``model_overloaded`` (shed clients wait the ``retry-after``, as OpenAI's
  SDKs do), and ``overload.reserve_for_high: 4`` keeps 4 of the 16 slots for high priority (Envoy's
  per-priority circuit breakers: the others wait in Envoy, not in the engines);
- ``shedding alone``: the same without the reserve (shedding reacts a scrape and a push late);
- ``neither`` (``overload.enabled: false``, no reserve): the same load, for contrast.

Priorities come from the ``x-gateway-priority`` header (the registry allows it here; with API keys they
come from the key). Reports high-priority TTFT p50/p99 per phase and its ratio to the unloaded p99 (goal:
within 1.5x), and how much low-priority traffic was shed or served.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from control_plane.devstack.procs import free_port
from loadtest._common import (
    SectionResult,
    fmt_ms,
    fmt_x,
    local_stack,
    markdown_table,
    percentile,
    ratio,
    stream_chat,
    wait_routable,
    write_results,
)

MODEL = "chat"
HEADER = "x-gateway-priority"
# A KV cache that 8 running requests of ~140 tokens fill: its use is the early sign of saturation, as
# with vLLM (whose batch is bounded by its KV cache).
SIM_ARGS = ["--max-batch", "8", "--decode-ms-per-token", "10", "--kv-cache-tokens", "1024"]


@dataclass(frozen=True)
class PrioritySettings:
    duration_s: float = 20.0
    warmup_s: float = 4.0  # load before measuring: saturation is decided from telemetry
    high_clients: int = 2
    low_clients: int = 48
    high_tokens: int = 16
    low_tokens: int = 128


@dataclass
class PhaseResult:
    name: str
    high_ttft: list[float] = field(default_factory=list)
    high_errors: Counter[str] = field(default_factory=Counter)
    low: Counter[str] = field(default_factory=Counter)  # "200" or the error code

    def figures(self) -> dict[str, Any]:
        return {
            "high_requests": len(self.high_ttft) + sum(self.high_errors.values()),
            "high_ttft_p50_s": percentile(self.high_ttft, 50),
            "high_ttft_p99_s": percentile(self.high_ttft, 99),
            "high_errors": dict(self.high_errors),
            "low": dict(self.low),
        }


def _registry(ports: list[int], shedding: bool, reserve: int) -> dict[str, Any]:
    return {
        "gateway": {"expose_upstream_host": True},
        "telemetry": {"interval_s": 0.5},
        "overload": {
            "enabled": shedding,
            "priority_header": True,
            # Shed low priority once the KV cache is 40 % used (about 5 of the 8 slots busy on average)
            # or requests wait for a slot, leaving headroom for high priority; back under 30 %.
            "saturated": {"queue_per_replica": 2, "kv_cache": 0.4},
            "severe": {"queue_per_replica": 1000},
            "clear_ratio": 0.75,
            "hold_s": 2,
            "retry_after_s": 2,
        },
        "models": [
            {
                "id": MODEL,
                "engine": "vllm",
                "endpoints": [{"url": f"http://127.0.0.1:{p}"} for p in ports],
                # The engines' 16 slots; `reserve` of them kept for high priority (per-priority circuit
                # breakers).
                "limits": {"max_concurrent_requests": 16, "max_pending_requests": 64},
                **({"overload": {"reserve_for_high": reserve}} if reserve else {}),
            }
        ],
    }


def _body(tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": tokens,
        "stream": stream,
    }


async def _low_client(
    session: aiohttp.ClientSession, url: str, stop_at: float, out: Counter[str], tokens: int
) -> None:
    while time.monotonic() < stop_at:
        try:
            async with session.post(url, json=_body(tokens, False), headers={HEADER: "low"}) as response:
                body = await response.json(content_type=None)
                if response.status == 200:
                    out["200"] += 1
                    continue
                out[str((body.get("error") or {}).get("code") or response.status)] += 1
                retry_after = float(response.headers.get("retry-after") or 1)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            out[type(exc).__name__] += 1
            retry_after = 1.0
        await asyncio.sleep(min(retry_after, max(0.0, stop_at - time.monotonic())))


async def _high_client(
    session: aiohttp.ClientSession,
    url: str,
    measure_from: float,
    stop_at: float,
    phase: PhaseResult,
    tokens: int,
) -> None:
    while time.monotonic() < stop_at:
        result = await stream_chat(session, url, _body(tokens, True), timeout_s=60)
        if result.started < measure_from:
            continue
        if result.ok:
            phase.high_ttft.append(result.ttft)
        else:
            phase.high_errors[str(result.status)] += 1
        await asyncio.sleep(0.05)  # a steady stream, not a closed loop as fast as it can go


async def _drive(base_url: str, phase: PhaseResult, settings: PrioritySettings, low: bool) -> None:
    url = f"{base_url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        # The high-priority stream: every request says so (stream_chat sends the session's headers).
        aiohttp.ClientSession(timeout=timeout, headers={HEADER: "high"}) as high_session,
    ):
        await wait_routable(session, base_url, MODEL)
        start = time.monotonic()
        measure_from = start + (settings.warmup_s if low else 0.5)
        stop_at = measure_from + settings.duration_s
        tasks = [
            _high_client(high_session, url, measure_from, stop_at, phase, settings.high_tokens)
            for _ in range(settings.high_clients)
        ]
        if low:
            tasks += [
                _low_client(session, url, stop_at, phase.low, settings.low_tokens)
                for _ in range(settings.low_clients)
            ]
        await asyncio.gather(*tasks)


def run_phase(
    name: str, settings: PrioritySettings, low: bool, shedding: bool, reserve: int = 0
) -> PhaseResult:
    ports = [free_port(), free_port()]
    extra = {f"{MODEL}-{i}": SIM_ARGS for i in range(len(ports))}
    phase = PhaseResult(name)
    with local_stack(_registry(ports, shedding, reserve), sim_extra_args=extra) as stack:
        asyncio.run(_drive(stack.envoys[0].url, phase, settings, low))
    return phase


def run(settings: PrioritySettings) -> SectionResult:
    started = time.monotonic()
    phases = [
        run_phase("unloaded", settings, low=False, shedding=True, reserve=4),
        run_phase("overloaded: shedding + reserve 4", settings, low=True, shedding=True, reserve=4),
        run_phase("overloaded: shedding alone", settings, low=True, shedding=True),
        run_phase("overloaded: neither", settings, low=True, shedding=False),
    ]
    reference = percentile(phases[0].high_ttft, 99)
    rows = []
    for phase in phases:
        figures = phase.figures()
        low_total = sum(phase.low.values())
        shed = phase.low.get("model_overloaded", 0)
        rows.append(
            [
                phase.name,
                figures["high_requests"],
                fmt_ms(1000 * figures["high_ttft_p50_s"], 1),
                fmt_ms(1000 * figures["high_ttft_p99_s"], 1),
                fmt_x(ratio(figures["high_ttft_p99_s"], reference)),
                sum(phase.high_errors.values()),
                low_total or "-",
                phase.low.get("200", 0) if low_total else "-",
                f"{shed} ({100 * shed / low_total:.0f} %)" if low_total else "-",
            ]
        )
    table = markdown_table(
        [
            "phase",
            "high requests",
            "high TTFT p50",
            "high TTFT p99",
            "p99 vs unloaded",
            "high errors",
            "low sent",
            "low served",
            "low shed",
        ],
        rows,
        align="lrrrrrrrr",
    )
    data = {
        "settings": settings.__dict__,
        "phases": {p.name: p.figures() for p in phases},
        "goal_p99_ratio": 1.5,
        "p99_ratio_shedding_reserve": ratio(percentile(phases[1].high_ttft, 99), reference),
    }
    note = (
        f"\n\n{settings.high_clients} high-priority streaming clients ({settings.high_tokens} tokens), "
        f"{settings.low_clients} low-priority clients ({settings.low_tokens} tokens, waiting `retry-after` "
        f"when shed), 2 replicas of 8 slots, {settings.duration_s:g} s measured per phase."
    )
    return SectionResult(
        key="priority",
        title="Priority under overload",
        markdown=table + note,
        data=data,
        wall_s=time.monotonic() - started,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    settings = PrioritySettings(duration_s=8.0, warmup_s=3.0) if args.quick else PrioritySettings()
    result = run(settings)
    print(f"## {result.title}\n\n{result.markdown}")
    path = write_results("priority", result.data)
    print(f"\nfigures: {path}")


if __name__ == "__main__":
    main()
