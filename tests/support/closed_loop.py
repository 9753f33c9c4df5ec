"""Closed-loop load for failure tests: N clients each send a chat completion, wait for its answer and send
the next, while actions (kill a replica, stop it, ...) run at set times. Bounded in time and in count."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class Outcome:
    started: float
    finished: float
    status: int  # 0: no HTTP answer at all
    code: str = ""  # the gateway's error.code, when it answered one
    endpoint: str = ""  # x-served-by-endpoint of a 200
    error: str = ""


@dataclass
class LoadRun:
    outcomes: list[Outcome] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # action name → when it ran

    def statuses(self) -> Counter[int]:
        return Counter(o.status for o in self.outcomes)

    def codes(self) -> Counter[str]:
        return Counter(o.code for o in self.outcomes if o.status != 200)

    def failures(self, limit: int = 5) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200][:limit]


@dataclass(frozen=True)
class Action:
    at_s: float  # after the load starts
    name: str
    run: Callable[[], Any]  # blocking; runs in a thread so the clients go on meanwhile


def _code(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except ValueError:
        return ""
    return str(error.get("code", "")) if isinstance(error, dict) else ""


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    try:
        response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        return Outcome(started, time.monotonic(), 0, error=f"{type(exc).__name__}: {exc}"[:200])
    finished = time.monotonic()
    if response.status_code == 200:
        return Outcome(started, finished, 200, endpoint=response.headers.get("x-served-by-endpoint", ""))
    return Outcome(started, finished, response.status_code, _code(response), error=response.text[:200])


async def _drive(
    base_url: str,
    model: str,
    clients: int,
    duration_s: float,
    actions: Sequence[Action],
    max_tokens: int,
    timeout_s: float,
    max_requests: int,
) -> LoadRun:
    run = LoadRun()
    url = f"{base_url}/v1/chat/completions"
    numbers = itertools.count()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.monotonic()
        stop_at = t0 + duration_s

        async def loop() -> None:
            while time.monotonic() < stop_at:
                index = next(numbers)
                if index >= max_requests:
                    return
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"request {index}"}],
                    "max_tokens": max_tokens,
                }
                run.outcomes.append(await _one(client, url, body))

        async def act(action: Action) -> None:
            await asyncio.sleep(max(0.0, t0 + action.at_s - time.monotonic()))
            run.marks[action.name] = time.monotonic()
            await asyncio.to_thread(action.run)

        await asyncio.gather(*(loop() for _ in range(clients)), *(act(a) for a in actions))
    return run


def closed_loop(
    base_url: str,
    model: str,
    *,
    clients: int,
    duration_s: float,
    actions: Sequence[Action] = (),
    max_tokens: int = 16,
    timeout_s: float = 60.0,
    max_requests: int = 20_000,
) -> LoadRun:
    """Run the load to its end (the last request started before `duration_s` is waited for)."""
    return asyncio.run(
        _drive(base_url, model, clients, duration_s, actions, max_tokens, timeout_s, max_requests)
    )


def sim_state(port: int) -> dict[str, Any]:
    """A simulator's knobs and counters (GET /sim/state)."""
    response = httpx.get(f"http://127.0.0.1:{port}/sim/state", timeout=5)
    response.raise_for_status()
    doc: dict[str, Any] = response.json()
    return doc


def envoy_counters(admin_url: str, cluster: str, names: Sequence[str]) -> dict[str, int]:
    """Some of a cluster's counters from Envoy's admin /stats (0 for one Envoy has not created)."""
    text = httpx.get(f"{admin_url}/stats", params={"filter": f"^cluster\\.{cluster}\\."}, timeout=5).text
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        values[key.removeprefix(f"cluster.{cluster}.")] = value
    return {n: int(values.get(n, "0")) for n in names}
