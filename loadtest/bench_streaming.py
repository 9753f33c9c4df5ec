"""Streaming through the gateway: added time to first chunk, and whether chunks keep their spacing.

One simulated vLLM server with a fixed decode time (no prefill cost, ``--decode-ms-per-token``), behind
the full local stack. Clients stream chat completions from it directly and through the gateway at the same
time (half of them each way, so both share the same server and the same batch), and the arrival time of
every SSE event is recorded. Per path: time to the response headers and to the first SSE chunk (it
carries the first token: the role and the first content come together); every gap between consecutive
content chunks; and the share of gaps under a quarter of the decode time (chunks that arrived glued
together, i.e. that lost their spacing).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from control_plane.devstack.procs import free_port
from loadtest._common import (
    SectionResult,
    fmt_ms,
    local_stack,
    markdown_table,
    percentile,
    wait_routable,
)

MODEL = "stream"


@dataclass(frozen=True)
class StreamingSettings:
    duration_s: float = 20.0
    clients_per_path: int = 2
    decode_ms: float = 20.0
    max_tokens: int = 32
    max_requests: int = 2000


@dataclass
class StreamTrace:
    path: str
    started: float
    headers_at: float = math.nan
    events: list[float] = field(default_factory=list)
    """Arrival times of the SSE events carrying content."""
    first_event_at: float = math.nan
    ok: bool = False
    error: str = ""


async def trace_stream(
    session: aiohttp.ClientSession, path: str, url: str, body: dict[str, Any]
) -> StreamTrace:
    trace = StreamTrace(path, time.perf_counter())
    try:
        async with asyncio.timeout(60), session.post(url, json=body) as response:
            trace.headers_at = time.perf_counter()
            if response.status != 200:
                trace.error = f"HTTP {response.status}"
                return trace
            async for raw in response.content:
                now = time.perf_counter()
                if not raw.startswith(b"data:"):
                    continue
                if math.isnan(trace.first_event_at):
                    trace.first_event_at = now
                data = raw[5:].strip()
                if data == b"[DONE]":
                    trace.ok = True
                    break
                # A content chunk carries a non-empty "content"; role-only and usage chunks do not.
                if b'"content":"' in data and b'"content":""' not in data:
                    trace.events.append(now)
    except (aiohttp.ClientError, TimeoutError) as exc:
        trace.error = f"{type(exc).__name__}: {exc}"
    return trace


def registry_doc(port: int) -> dict[str, Any]:
    return {
        "gateway": {"expose_upstream_host": True},
        "models": [
            {
                "id": MODEL,
                "engine": "vllm",
                "endpoints": [{"id": f"{MODEL}-0", "url": f"http://127.0.0.1:{port}"}],
            }
        ],
    }


async def drive(direct: str, gateway: str, settings: StreamingSettings) -> list[StreamTrace]:
    traces: list[StreamTrace] = []
    counter = itertools.count()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        await wait_routable(session, gateway, MODEL)
        stop_at = time.monotonic() + settings.duration_s

        async def client(path: str, base: str) -> None:
            while time.monotonic() < stop_at:
                index = next(counter)
                if index >= settings.max_requests:
                    return
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Count slowly."}],
                    "max_tokens": settings.max_tokens,
                    "stream": True,
                    "seed": index,
                }
                traces.append(await trace_stream(session, path, f"{base}/v1/chat/completions", body))

        # Both paths at once, so that they share the server's batch and the host's load.
        await asyncio.gather(
            *(client("direct", direct) for _ in range(settings.clients_per_path)),
            *(client("gateway", gateway) for _ in range(settings.clients_per_path)),
        )
    return traces


def summarize(traces: list[StreamTrace], settings: StreamingSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    glued_below = settings.decode_ms / 4 / 1000
    for path in ("direct", "gateway"):
        mine = [t for t in traces if t.path == path]
        ok = [t for t in mine if t.ok and t.events]
        gaps = [b - a for t in ok for a, b in itertools.pairwise(t.events)]
        headers = [t.headers_at - t.started for t in ok]
        first_event = [t.first_event_at - t.started for t in ok]
        first_content = [t.events[0] - t.started for t in ok]
        out[path] = {
            "requests": len(mine),
            "errors": len(mine) - len(ok),
            "gaps": len(gaps),
            "headers_p50_ms": percentile(headers, 50) * 1000,
            "first_chunk_p50_ms": percentile(first_event, 50) * 1000,
            "first_chunk_p99_ms": percentile(first_event, 99) * 1000,
            "first_content_p50_ms": percentile(first_content, 50) * 1000,
            "first_content_p99_ms": percentile(first_content, 99) * 1000,
            "gap_p1_ms": percentile(gaps, 1) * 1000,
            "gap_p50_ms": percentile(gaps, 50) * 1000,
            "gap_p99_ms": percentile(gaps, 99) * 1000,
            "gap_max_ms": max(gaps, default=math.nan) * 1000,
            "glued_share": sum(g < glued_below for g in gaps) / len(gaps) if gaps else math.nan,
            "errors_sample": sorted({t.error for t in mine if t.error})[:3],
        }
    return out


def render(summary: dict[str, Any], settings: StreamingSettings) -> str:
    d, g = summary["direct"], summary["gateway"]

    def diff(key: str) -> str:
        value = g[key] - d[key]
        return "n/a" if not math.isfinite(value) else f"{value:+.2f} ms"

    rows = []
    for label, key in (
        ("response headers, p50", "headers_p50_ms"),
        ("first SSE chunk, p50", "first_chunk_p50_ms"),
        ("first SSE chunk, p99", "first_chunk_p99_ms"),
        ("gap between content chunks, p1", "gap_p1_ms"),
        ("gap between content chunks, p50", "gap_p50_ms"),
        ("gap between content chunks, p99", "gap_p99_ms"),
        ("gap between content chunks, max", "gap_max_ms"),
    ):
        rows.append([label, fmt_ms(d[key]), fmt_ms(g[key]), diff(key)])
    rows.append(
        [
            f"gaps under {settings.decode_ms / 4:g} ms (chunks glued together)",
            f"{d['glued_share']:.2%}",
            f"{g['glued_share']:.2%}",
            f"{(g['glued_share'] - d['glued_share']) * 100:+.2f} pts",
        ]
    )
    rows.append(
        ["streams (errors)", f"{d['requests']} ({d['errors']})", f"{g['requests']} ({g['errors']})", ""]
    )
    rows.append(["gaps measured", d["gaps"], g["gaps"], ""])
    return (
        f"One simulated vLLM server, decode {settings.decode_ms:g} ms per token (plus 2 % per other request "
        f"in its batch), no prefill cost, `max_tokens` {settings.max_tokens}; {settings.clients_per_path} "
        f"closed-loop streaming clients direct and {settings.clients_per_path} through the gateway at the "
        f"same time for {settings.duration_s:g} s.\n\n"
        + markdown_table(["", "direct", "gateway", "gateway - direct"], rows)
        + "\n"
    )


def run(settings: StreamingSettings) -> SectionResult:
    started = time.monotonic()
    port = free_port()
    sim_args = ["--prefill-base-ms", "0", "--prefill-per-token-ms", "0", "--decode-ms-per-token"]
    sim_args += [f"{settings.decode_ms:g}", "--max-batch", "64"]
    with local_stack(
        registry_doc(port), sim_profile="default", sim_extra_args={f"{MODEL}-0": sim_args}
    ) as stack:
        traces = asyncio.run(drive(f"http://127.0.0.1:{port}", stack.envoys[0].url, settings))
    summary = summarize(traces, settings)
    markdown = render(summary, settings)
    data = {"settings": asdict(settings), "summary": summary}
    return SectionResult("streaming", "Streaming", markdown, data, time.monotonic() - started)
