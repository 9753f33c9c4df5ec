"""Benchmark: prefix-affine balancing vs round robin and least request on multi-turn chat.

64 conversations of 4 to 10 turns share one system prompt; each turn resends the whole history (user
turns of about 150 tokens, assistant turns of about 100). ``--clients`` closed-loop clients each take the
next conversation and play its turns one after the other. Four simulated vLLM replicas (``make run``'s
code: simulators, control plane, Envoy; a fresh stack per policy) have a prefix cache smaller than the
working set (``--cache-tokens`` each) and a prefill cost per uncached token, so where a turn lands decides
how much of its prompt is computed again.

Reported per policy: TTFT p50/p90/p99 (client-side, first content chunk of the stream), prompt tokens
computed and the prefix-cache hit rate (from the simulators' ``vllm:prefix_cache_*`` counters), throughput,
per-replica load spread (max / mean of request-seconds, i.e. of mean requests in flight), and Envoy's CPU
per request. A second, skewed run puts half of the clients on one hot conversation prefix (prefix-affine
only) to show the load bound.

    python -m loadtest.bench_prefix [--clients 32] [--conversations 64] [--out FILE.md]

A benchmark, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from control_plane.devstack.procs import free_port
from loadtest._common import (
    CpuMeter,
    SectionResult,
    StreamResult,
    finite,
    fmt_x,
    local_stack,
    machine_info,
    markdown_table,
    percentile,
    ratio,
    stack_processes,
    stream_chat,
    wait_routable,
    write_results,
)

MODEL = "chat"
REPLICAS = 4
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "rr": ("round robin", {"load_balancing": "round_robin"}),
    "lr": ("least request", {"load_balancing": "least_request"}),
    "pa": ("prefix affinity", {"load_balancing": "prefix_affinity"}),
    "pa125": (
        "prefix affinity, bound 125 %",
        {"load_balancing": "prefix_affinity", "prefix_load_bound_percent": 125},
    ),
}
_WORDS = ("the", "river", "city", "plan", "trip", "budget", "hotel", "museum", "train", "ticket", "food")


@dataclass(frozen=True)
class Settings:
    conversations: int = 64
    clients: int = 64
    min_turns: int = 4
    max_turns: int = 10
    max_tokens: int = 24
    ramp_s: float = 4.0
    """Clients start spread over this long: conversations begin at different times, not in one burst that
    finds every cache cold."""
    think_s: tuple[float, float] = (0.5, 2.5)
    """A user's pause between an answer and their next turn (uniform): while they read, the replica
    their conversation was on serves others, as in real chat traffic."""
    cache_tokens: int = 32768
    sim_args: tuple[str, ...] = (
        *("--prefill-base-ms", "10", "--prefill-per-token-ms", "0.25"),
        *("--decode-ms-per-token", "10", "--max-batch", "32"),
    )
    seed: int = 11
    request_timeout_s: float = 120.0


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def make_conversations(settings: Settings, hot: bool = False) -> list[list[list[dict[str, str]]]]:
    """Each conversation as the message lists of its turns (turn k resends turns 1..k-1 and their answers).

    ``hot``: every other conversation starts with the same first user message: one hot prefix, half of
    the traffic."""
    rng = random.Random(settings.seed)
    system = {"role": "system", "content": "You are a travel assistant. " + _text(rng, 2000)}
    opening = _text(rng, 600)
    out = []
    for index in range(settings.conversations):
        turns = rng.randint(settings.min_turns, settings.max_turns)
        first = opening if hot and index % 2 == 0 else f"Conversation {index}: " + _text(rng, 600)
        history = [system, {"role": "user", "content": first}]
        conversation = [list(history)]
        for _ in range(1, turns):
            history += [
                {"role": "assistant", "content": _text(rng, 400)},
                {"role": "user", "content": _text(rng, 600)},
            ]
            conversation.append(list(history))
        out.append(conversation)
    return out


@dataclass
class Run:
    label: str
    results: list[StreamResult] = field(default_factory=list)
    wall_s: float = 0.0
    cache: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Endpoint id → (prefix-cache hit tokens, queried tokens) from its /metrics."""
    cpu: dict[str, Any] = field(default_factory=dict)
    in_flight: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    """Endpoint id → its running + queued requests, sampled every 0.25 s."""
    repeats: int = 0
    """Turns after the first served by the replica that served the conversation's previous turn."""
    later_turns: int = 0


async def _cache_counters(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values.get("vllm:prefix_cache_hits_total", 0.0), values.get("vllm:prefix_cache_queries_total", 0.0)


async def _drive(
    base_url: str,
    sims: Mapping[str, str],
    plan: Sequence[Sequence[list[dict[str, str]]]],
    settings: Settings,
    run: Run,
    meter: CpuMeter,
) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await wait_routable(session, base_url, MODEL)
        before = {e: await _cache_counters(session, url) for e, url in sims.items()}
        queue = list(range(len(plan)))
        url = f"{base_url}/v1/chat/completions"

        async def client(number: int) -> None:
            rng = random.Random(settings.seed * 1000 + number)
            await asyncio.sleep(settings.ramp_s * number / max(1, settings.clients))
            while queue:
                conversation = plan[queue.pop(0)]
                previous = ""
                for turn, messages in enumerate(conversation):
                    if turn:
                        await asyncio.sleep(rng.uniform(*settings.think_s))
                    body = {"model": MODEL, "messages": messages, "max_tokens": settings.max_tokens}
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                    result = await stream_chat(session, url, body, settings.request_timeout_s)
                    run.results.append(result)
                    if turn:
                        run.later_turns += 1
                        run.repeats += result.endpoint == previous
                    previous = result.endpoint

        async def sample() -> None:
            while True:
                for endpoint, sim_url in sims.items():
                    async with session.get(f"{sim_url}/sim/state") as response:
                        state = await response.json()
                    run.in_flight[endpoint].append(int(state["running"]) + int(state["queue"]))
                await asyncio.sleep(0.25)

        started = time.monotonic()
        meter.start()
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(client(n) for n in range(settings.clients)))
        sampler.cancel()
        run.cpu = meter.stop()
        run.wall_s = time.monotonic() - started
        for endpoint, sim_url in sims.items():
            hits, queries = await _cache_counters(session, sim_url)
            run.cache[endpoint] = (hits - before[endpoint][0], queries - before[endpoint][1])


def run_policy(
    label: str, fields: Mapping[str, Any], plan: Sequence[Sequence[list[dict[str, str]]]], settings: Settings
) -> Run:
    ports = [free_port() for _ in range(REPLICAS)]
    ids = [f"{MODEL}-{i}" for i in range(REPLICAS)]
    doc = {
        "gateway": {"expose_upstream_host": True},
        "models": [
            {
                "id": MODEL,
                "engine": "vllm",
                **fields,
                "endpoints": [
                    {"id": e, "url": f"http://127.0.0.1:{p}"} for e, p in zip(ids, ports, strict=True)
                ],
            }
        ],
    }
    args = [*settings.sim_args, "--prefix-cache-tokens", str(settings.cache_tokens)]
    run = Run(label)
    print(f"[prefix] {label}: {sum(len(c) for c in plan)} requests ...", file=sys.stderr, flush=True)
    with local_stack(doc, sim_profile="default", sim_extra_args={e: args for e in ids}) as stack:
        sims = {e: f"http://127.0.0.1:{p}" for e, p in zip(ids, ports, strict=True)}
        meter = CpuMeter(stack_processes(stack))
        asyncio.run(_drive(stack.envoys[0].url, sims, plan, settings, run, meter))
    return run


def summarize(run: Run) -> dict[str, Any]:
    ok = [r for r in run.results if r.ok]
    ttfts = [r.ttft for r in ok]
    busy: dict[str, float] = defaultdict(float)
    served: dict[str, int] = defaultdict(int)
    for r in ok:
        busy[r.endpoint] += r.latency
        served[r.endpoint] += 1
    hits = sum(h for h, _ in run.cache.values())
    queries = sum(q for _, q in run.cache.values())
    cores = run.cpu.get("cores_used", {})
    envoy_cpu_s = sum(v for k, v in cores.items() if k.startswith("envoy:")) * run.cpu.get("wall_s", 0.0)
    mean_busy = sum(busy.values()) / REPLICAS if busy else float("nan")
    return {
        "policy": run.label,
        "requests": len(run.results),
        "errors": len(run.results) - len(ok),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "prompt_tokens": queries,
        "prompt_tokens_computed": queries - hits,
        "cache_hit_rate": ratio(hits, queries),
        "throughput_rps": len(ok) / run.wall_s if run.wall_s else float("nan"),
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / run.wall_s if run.wall_s else 0.0,
        "load_spread": max(busy.values()) / mean_busy if busy else float("nan"),
        "mean_in_flight": {e: sum(v) / len(v) for e, v in sorted(run.in_flight.items()) if v},
        "same_replica_share": ratio(run.repeats, run.later_turns),
        "requests_per_replica": dict(sorted(served.items())),
        "envoy_cpu_us_per_request": envoy_cpu_s / len(run.results) * 1e6 if run.results else float("nan"),
        "wall_s": run.wall_s,
    }


def _ms(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value == value else "n/a"


def render(summaries: Sequence[dict[str, Any]], skewed: dict[str, Any] | None, settings: Settings) -> str:
    rows = [
        [
            s["policy"],
            s["requests"],
            s["errors"],
            _ms(s["ttft_p50_s"]),
            _ms(s["ttft_p90_s"]),
            _ms(s["ttft_p99_s"]),
            f"{s['prompt_tokens_computed']:,.0f}",
            f"{s['cache_hit_rate']:.0%}",
            f"{s['throughput_rps']:.1f}",
            f"{s['load_spread']:.2f}x",
            f"{s['same_replica_share']:.0%}",
            f"{s['envoy_cpu_us_per_request']:.0f} µs",
        ]
        for s in summaries
    ]
    header = ["policy", "requests", "errors", "TTFT p50", "TTFT p90", "TTFT p99", "prompt tokens computed"]
    header += ["cache hit rate", "req/s", "load spread (max/mean)", "same replica", "Envoy CPU / request"]
    lr = next((s for s in summaries if s["policy"] == "least request"), None)
    pa = next((s for s in summaries if s["policy"] == "prefix affinity"), None)
    lines = [
        f"Setup: {REPLICAS} simulated vLLM replicas (prefill 10 ms + 0.25 ms per uncached token, decode 10 "
        f"ms/token, prefix cache {settings.cache_tokens:,} tokens each), {settings.conversations} "
        f"conversations of {settings.min_turns}-{settings.max_turns} turns sharing a ~500-token system "
        "prompt (user turns ~150 tokens, assistant ~100, history resent), "
        f"{settings.clients} streaming clients starting over {settings.ramp_s:g} s, each playing one "
        f"conversation with a {settings.think_s[0]:g}-{settings.think_s[1]:g} s pause between turns, "
        f"{settings.max_tokens} output tokens per turn, a fresh stack per policy.",
        "",
        markdown_table(header, rows),
        "",
    ]
    if lr and pa:
        lines.append(
            f"Prefix affinity vs least request: TTFT p90 {fmt_x(ratio(lr['ttft_p90_s'], pa['ttft_p90_s']))} "
            f"lower, p50 {fmt_x(ratio(lr['ttft_p50_s'], pa['ttft_p50_s']))} lower; prompt tokens computed "
            f"{fmt_x(ratio(lr['prompt_tokens_computed'], pa['prompt_tokens_computed']))} fewer; throughput "
            f"{fmt_x(ratio(pa['throughput_rps'], lr['throughput_rps']))}."
        )
        lines.append("")
    lines.append(
        "Load spread: the busiest replica's request-seconds (its mean requests in flight) over the mean. "
        "Same replica: turns served by the replica of their conversation's previous turn. "
        "Envoy CPU / request: Envoy's CPU time over the run (streams included) per request."
    )
    if skewed:
        per = skewed["requests_per_replica"]
        flights = skewed["mean_in_flight"]
        total = sum(per.values())
        lines += [
            "",
            "Skewed (prefix affinity, default bound): every other conversation opens with the same first "
            f"message, so half of the {skewed['requests']} requests share one prefix. Requests per replica: "
            + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in per.items())
            + "; mean requests in flight: "
            + ", ".join(f"{k} {v:.1f}" for k, v in flights.items())
            + f"; load spread {skewed['load_spread']:.2f}x; TTFT p50 {_ms(skewed['ttft_p50_s'])}, p90 "
            f"{_ms(skewed['ttft_p90_s'])}; cache hit rate {skewed['cache_hit_rate']:.0%}. Unbounded, the hot "
            "prefix's replica would take its half plus a quarter of the rest: 62 % of the requests.",
        ]
    return "\n".join(lines) + "\n"


def run(
    settings: Settings | None = None, skewed: bool = True, policies: Sequence[str] = tuple(VARIANTS)
) -> SectionResult:
    settings = settings or Settings()
    started = time.monotonic()
    plan = make_conversations(settings)
    summaries = [summarize(run_policy(*VARIANTS[key], plan, settings)) for key in VARIANTS if key in policies]
    skew = None
    if skewed:
        label, fields = VARIANTS["pa"]
        skew = summarize(
            run_policy(f"{label}, one hot prefix", fields, make_conversations(settings, True), settings)
        )
    data = finite(
        {
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
            "policies": summaries,
            "skewed": skew,
        }
    )
    return SectionResult(
        "prefix",
        "Prefix-affine balancing on multi-turn chat",
        render(summaries, skew, settings),
        data,
        time.monotonic() - started,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_prefix", description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--clients", type=int, default=64, help="conversations in progress at once")
    p.add_argument("--policies", default=",".join(VARIANTS), help=f"among {', '.join(VARIANTS)}")
    p.add_argument("--cache-tokens", type=int, default=32768, help="prefix cache of each replica, in tokens")
    p.add_argument("--no-skewed", action="store_true", help="leave out the one-hot-prefix run")
    p.add_argument("--out", type=argparse.FileType("w"), help="also write the markdown report here")
    args = p.parse_args(argv)
    settings = Settings(
        conversations=args.conversations, clients=args.clients, cache_tokens=args.cache_tokens
    )
    result = run(settings, skewed=not args.no_skewed, policies=args.policies.split(","))
    command = "python -m loadtest.bench_prefix" + (" " + shlex.join(argv) if argv else "")
    report = f"{machine_info()['date_utc']}, command: `{command}`\n\n{result.markdown}"
    print(report)
    if args.out:
        args.out.write(report)
    print(f"results: {write_results('bench_prefix', result.data)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
