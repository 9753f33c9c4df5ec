"""The other half of the failover benchmark: retries must not multiply load on a fleet that is merely
overloaded. Closed-loop non-streaming clients against two-replica models that are full or slow; for each,
how many requests the engines received per request a client sent, and Envoy's retries.

- ``full``: engines that run 8 and queue 8, then answer 503 (how an engine says it is full);
- ``full-retry-503``: the same, with the registry asking to retry 503 (``retriable_status_codes``), to
  show what the default avoids;
- ``slow`` / ``slow-no-timeout-retry``: every answer takes longer than two idle timeouts (1 s), with the
  default ``timeout_retries: 1`` and with 0.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp

from control_plane.devstack.procs import free_port
from control_plane.xds.resources import cluster_name
from loadtest._common import envoy_counters, local_stack, markdown_table, wait_routable

FULL_ARGS = ["--decode-ms-per-token", "20", "--max-batch", "8", "--max-queue", "8"]
SLOW_ARGS = ["--decode-ms-per-token", "150", "--max-batch", "64"]
SLOW_LIMITS = {"idle_timeout_s": 1.0}
FLEETS: dict[str, tuple[list[str], dict[str, Any], str]] = {
    # name: simulator flags, registry settings of the model, what it shows
    "full": (FULL_ARGS, {}, "engines full (503), defaults"),
    "full-retry-503": (FULL_ARGS, {"retry": {"retriable_status_codes": [503]}}, "same, retrying 503"),
    "slow": (SLOW_ARGS, {"limits": SLOW_LIMITS}, "answers > 2 idle timeouts, defaults"),
    "slow-no-timeout-retry": (
        SLOW_ARGS,
        {"limits": SLOW_LIMITS, "retry": {"timeout_retries": 0}},
        "same, `timeout_retries: 0`",
    ),
}
COUNTERS = ("upstream_rq_total", "upstream_rq_retry", "upstream_rq_per_try_idle_timeout")


@dataclass(frozen=True)
class OverloadRow:
    fleet: str
    what: str
    requests: int
    answered: dict[str, int]  # "200" or the error code → count
    engine_requests: int
    retries: int
    per_try_timeouts: int

    @property
    def per_request(self) -> float:
        return self.engine_requests / self.requests if self.requests else float("nan")


def _engine_requests(ports: list[int]) -> int:
    total = 0
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/state", timeout=5) as response:
            total += int(json.loads(response.read())["requests"])
    return total


async def _load(base_url: str, model: str, clients: int, duration_s: float) -> Counter[str]:
    answered: Counter[str] = Counter()
    numbers = itertools.count()
    url = f"{base_url}/v1/chat/completions"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        await wait_routable(session, base_url, model)
        stop_at = time.monotonic() + duration_s

        async def client() -> None:
            while time.monotonic() < stop_at:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"request {next(numbers)}"}],
                    "max_tokens": 16,
                }
                try:
                    async with session.post(url, json=body) as response:
                        doc = await response.json(content_type=None)
                        if response.status == 200:
                            answered["200"] += 1
                        else:
                            error = doc.get("error") if isinstance(doc, dict) else None
                            code = error.get("code") if isinstance(error, dict) else None
                            answered[f"{response.status} {code or 'engine'}"] += 1
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    answered[type(exc).__name__] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return answered


def run_overload(clients: int, duration_s: float) -> list[OverloadRow]:
    ports = {name: [free_port(), free_port()] for name in FLEETS}
    doc = {
        "gateway": {"expose_upstream_host": True},
        "models": [
            {
                "id": name,
                "engine": "vllm",
                "endpoints": [{"url": f"http://127.0.0.1:{p}"} for p in ports[name]],
                **settings,
            }
            for name, (_, settings, _) in FLEETS.items()
        ],
    }
    extra = {f"{name}-{i}": args for name, (args, _, _) in FLEETS.items() for i in range(2)}
    rows = []
    with local_stack(doc, sim_profile="default", sim_extra_args=extra) as stack:
        envoy = stack.envoys[0]
        for name, (_, _, what) in FLEETS.items():
            cluster = f"cluster.{cluster_name(name)}."
            before = envoy_counters(envoy.admin_url)
            engines_before = _engine_requests(ports[name])
            answered = asyncio.run(_load(envoy.url, name, clients, duration_s))
            after = envoy_counters(envoy.admin_url)
            delta = {c: after.get(cluster + c, 0) - before.get(cluster + c, 0) for c in COUNTERS}
            rows.append(
                OverloadRow(
                    fleet=name,
                    what=what,
                    requests=sum(answered.values()),
                    answered=dict(answered),
                    # The warm-up request of wait_routable reached an engine too.
                    engine_requests=_engine_requests(ports[name]) - engines_before - 1,
                    retries=delta["upstream_rq_retry"],
                    per_try_timeouts=delta["upstream_rq_per_try_idle_timeout"],
                )
            )
    return rows


def render_overload(rows: list[OverloadRow], clients: int, duration_s: float) -> str:
    table = markdown_table(
        [
            "fleet",
            "",
            "client requests",
            "answers",
            "requests the engines received",
            "per client request",
            "Envoy retries",
        ],
        [
            [
                f"`{r.fleet}`",
                r.what,
                r.requests,
                ", ".join(f"{k}: {v}" for k, v in sorted(r.answered.items())),
                r.engine_requests,
                f"{r.per_request:.2f}",
                r.retries,
            ]
            for r in rows
        ],
        "llrlrrr",
    )
    return (
        f"Overloaded fleets, two replicas each, {clients} closed-loop non-streaming clients for "
        f"{duration_s:g} s per fleet. `full`: engines run 8 and queue 8 requests, then answer 503. `slow`: "
        "every answer takes about 2.4 s, the model's `idle_timeout_s` is 1 s.\n\n" + table + "\n"
    )
