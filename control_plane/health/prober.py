"""Probe every endpoint on its own schedule and report health transitions as they happen.

Thresholds give hysteresis: `unhealthy_threshold` failures in a row take an endpoint out,
`healthy_threshold` successes bring it back. An endpoint that serves the wrong model is out at once.
A never-probed endpoint is UNKNOWN, which Envoy treats as routable.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from control_plane.health.probes import ProbeResult, ProbeTarget, cancel_quietly, probe
from control_plane.state import Health

log = logging.getLogger(__name__)

OnChange = Callable[[str, Health, str], None]
OnResult = Callable[[ProbeTarget, ProbeResult], None]


@dataclass
class EndpointHealth:
    health: Health = Health.UNKNOWN
    reason: str = "not probed yet"
    successes: int = 0
    failures: int = 0
    last_probe_at: float | None = None  # wall clock, for display
    since: float | None = None


def next_health(current: EndpointHealth, result: ProbeResult, target: ProbeTarget) -> Health:
    """The state machine of one endpoint (pure)."""
    if result.wrong_model:
        return Health.UNHEALTHY
    if result.ok:
        if current.health != Health.HEALTHY and (
            current.successes >= target.check.healthy_threshold or current.health == Health.UNKNOWN
        ):
            return Health.HEALTHY
        return current.health
    if current.failures >= target.check.unhealthy_threshold:
        return Health.UNHEALTHY
    return current.health


class HealthProber:
    def __init__(
        self, on_change: OnChange, on_result: OnResult | None = None, rng: random.Random | None = None
    ) -> None:
        self._on_change = on_change
        self._on_result = on_result
        self._rng = rng or random.Random()
        self._targets: dict[str, ProbeTarget] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._status: dict[str, EndpointHealth] = {}
        self._session: aiohttp.ClientSession | None = None

    def status(self, endpoint_id: str) -> EndpointHealth | None:
        return self._status.get(endpoint_id)

    def health_map(self) -> dict[str, Health]:
        return {endpoint: status.health for endpoint, status in self._status.items()}

    async def update_targets(self, targets: list[ProbeTarget]) -> None:
        """Start probing new targets, stop removed ones, restart changed ones (new URL or settings)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        wanted = {t.endpoint_id: t for t in targets}
        for endpoint_id in list(self._tasks):
            if endpoint_id not in wanted or wanted[endpoint_id] != self._targets[endpoint_id]:
                await cancel_quietly(self._tasks.pop(endpoint_id))
                if (
                    endpoint_id not in wanted
                    or wanted[endpoint_id].base_url != self._targets[endpoint_id].base_url
                ):
                    self._status.pop(endpoint_id, None)
                del self._targets[endpoint_id]
        for endpoint_id, target in wanted.items():
            if endpoint_id not in self._tasks:
                self._targets[endpoint_id] = target
                self._status.setdefault(endpoint_id, EndpointHealth())
                self._tasks[endpoint_id] = asyncio.create_task(self._run(target), name=f"probe-{endpoint_id}")

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            await cancel_quietly(task)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _delay(self, target: ProbeTarget) -> float:
        spread = target.check.interval_s * target.check.jitter
        return max(0.05, target.check.interval_s + self._rng.uniform(-spread, spread))

    async def probe_now(self, target: ProbeTarget) -> ProbeResult:
        assert self._session is not None
        result = await probe(self._session, target)
        self._record(target, result)
        return result

    def _record(self, target: ProbeTarget, result: ProbeResult) -> None:
        status = self._status.setdefault(target.endpoint_id, EndpointHealth())
        if result.ok:
            status.successes, status.failures = status.successes + 1, 0
        else:
            status.successes, status.failures = 0, status.failures + 1
        status.last_probe_at = time.time()
        if self._on_result is not None:
            self._on_result(target, result)
        health = next_health(status, result, target)
        reason = "" if result.ok else result.reason
        if health != status.health or (health == Health.UNHEALTHY and reason and reason != status.reason):
            changed = health != status.health
            status.health, status.reason, status.since = health, reason, time.time()
            if changed:
                log.warning(
                    "endpoint %s of %s is now %s%s",
                    target.endpoint_id,
                    target.model.id,
                    health.value,
                    f": {reason}" if reason else "",
                )
                self._on_change(target.endpoint_id, health, reason)
        elif result.ok:
            status.reason = ""

    async def _run(self, target: ProbeTarget) -> None:
        # A random first delay spreads the probes of many endpoints over the interval.
        await asyncio.sleep(self._rng.uniform(0, target.check.interval_s * max(target.check.jitter, 0.05)))
        while True:
            await self.probe_now(target)
            await asyncio.sleep(self._delay(target))
