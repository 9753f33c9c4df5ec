"""Replacing launched replicas (lifecycle/supervision.py) over fake engines: one the probes mark unhealthy
for long enough is stopped and a new one published in its place; a last replica that exits is restarted
while requests wait for it; restarts back off and are bounded, after which the model is failed with the
reason. The end-to-end run over real engines and Envoy is tests/integration/test_lifecycle_replace.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from control_plane.config.lifecycle import RestartSettings
from control_plane.config.schema import Registry
from control_plane.lifecycle.errors import LoadFailed
from control_plane.lifecycle.manager import LifecycleManager
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.telemetry.scraper import TelemetryScraper
from tests.unit.control_plane.lifecycle.test_autoscale import FixedPolicy, NoSignals

pytestmark = pytest.mark.unit


class Engine:
    """A fake engine whose exit the test triggers (`crash`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.running = False
        self.stopped = False
        self._on_exit: list[Any] = []

    async def start(self) -> None:
        self.running = True

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.sleep(0)

    async def stop(self, grace_s: float) -> None:
        await asyncio.sleep(0.05)  # a request made meanwhile waits for the outcome
        self.running, self.stopped = False, True

    def on_exit(self, callback: Any) -> None:
        self._on_exit.append(callback)

    def crash(self) -> None:
        self.running = False
        for callback in self._on_exit:
            callback(1, "Segmentation fault")


class Harness:
    def __init__(self, **launch: Any) -> None:
        self.published: dict[str, tuple[Any, ...]] = {}
        self.engines: list[Engine] = []
        self.unhealthy: set[str] = set()
        self.metrics = LifecycleMetrics.create(CollectorRegistry())
        ports = iter(range(31000, 32000))

        def engine(spec: Any, model: Any) -> Engine:
            self.engines.append(Engine(spec.port))
            return self.engines[-1]

        self.manager = LifecycleManager(
            lambda model_id, replicas: self.published.__setitem__(model_id, replicas),
            engine,
            metrics=self.metrics,
            free_port=lambda: next(ports),
            report_interval_s=0.01,
            policy=FixedPolicy(),
            signals=NoSignals(TelemetryScraper(), lambda address: 0, time.monotonic),
        )
        self.manager.set_health(lambda replica_id: replica_id in self.unhealthy)
        self.registry = Registry.model_validate(
            {"models": [{"id": "m", "engine": "vllm", "launch": {"memory_mb": 1000, **launch}}]}
        )

    async def settle(self, until: Any, what: str, passes: int = 200) -> None:
        for _ in range(passes):
            await self.manager.tick()
            await asyncio.sleep(0.01)
            if until():
                return
        raise AssertionError(f"not reached: {what}; events {self.events()}")

    def ports(self) -> list[int]:
        return [r.port for r in self.published.get("m", ())]

    def events(self) -> list[tuple[str, str]]:
        return [(e["event"], e["detail"]) for e in reversed(self.manager.events())]

    def restarts(self, reason: str) -> float:
        value = self.metrics.restarts.labels("m", reason)._value.get()
        return float(value)


RESTART = {"unhealthy_after_s": 0.05, "backoff_s": 0.01, "drain_s": 0.2}


def test_an_unhealthy_replica_is_replaced_while_the_other_serves() -> None:
    asyncio.run(_unhealthy_replaced())


async def _unhealthy_replaced() -> None:
    h = Harness(min_replicas=2, max_replicas=2, restart=RESTART)
    await h.manager.follow(h.registry)
    await h.settle(lambda: len(h.ports()) == 2, "two replicas")
    first, second = h.engines
    h.unhealthy.add(f"m-launched-{first.port}")
    # Out of Envoy's rotation at once, the other still published; then a new one beside it.
    await h.settle(lambda: h.ports() == [second.port], "the unhealthy one unpublished")
    assert h.manager.status("m")["state"] == "ready"
    await h.settle(lambda: len(h.ports()) == 2, "a replacement published")
    assert first.stopped and not second.stopped and len(h.engines) == 3
    assert set(h.ports()) == {second.port, h.engines[2].port}
    events = [e for e, _ in h.events()]
    after = events[events.index("replica unhealthy") :]
    assert after == ["replica unhealthy", "replica restarting", "replica ready"], events
    assert h.restarts("unhealthy") == 1 and h.manager.status("m")["state"] == "ready"
    # A replica healthy again before the delay is kept.
    third = h.engines[2]
    h.unhealthy.add(f"m-launched-{third.port}")
    await h.manager.tick()
    h.unhealthy.clear()
    await h.settle(lambda: True, "a tick")
    assert not third.stopped
    await h.manager.close()


def test_a_last_replica_that_exits_is_restarted_while_requests_wait() -> None:
    asyncio.run(_last_exits())


async def _last_exits() -> None:
    h = Harness(restart={**RESTART, "backoff_s": 0.3})
    await h.manager.follow(h.registry)
    await h.manager.load("m")
    old = h.engines[0]
    old.crash()
    # The model is loading again: no replica in EDS (the activator takes its requests) ...
    assert h.manager.status("m")["state"] == "loading" and h.ports() == []
    # ... and a request waits for the new replica rather than failing.
    _host, port = await asyncio.wait_for(h.manager.acquire("m"), 5)
    h.manager.release("m")
    assert port == h.engines[1].port != old.port and h.ports() == [port]
    assert h.manager.status("m")["state"] == "ready" and h.restarts("exited") == 1
    assert ("replica restarting", "in 0.3 s (1 of 3 in 600 s)") in h.events()
    await h.manager.close()


def test_restarts_back_off_and_a_replica_that_keeps_failing_fails_the_model() -> None:
    asyncio.run(_keeps_failing())


async def _keeps_failing() -> None:
    h = Harness(restart={**RESTART, "max_restarts": 2, "backoff_s": 0.02})
    await h.manager.follow(h.registry)
    await h.manager.load("m")
    for nth in (1, 2):
        h.engines[-1].crash()
        await h.settle(lambda: len(h.ports()) == 1, f"restart {nth}")
    delays = [d for e, d in h.events() if e == "replica restarting"]
    assert delays == ["in 0.02 s (1 of 2 in 600 s)", "in 0.04 s (2 of 2 in 600 s)"]
    h.engines[-1].crash()  # the third failure within the window: given up
    # A request waiting for the replacement is answered with the reason.
    with pytest.raises(LoadFailed, match="max_restarts 2"):
        await asyncio.wait_for(h.manager.acquire("m"), 5)
    status = h.manager.status("m")
    assert "failed 3 times within 600 s (max_restarts 2)" in status["reason"], status
    assert "Segmentation fault" in status["reason"] and status["replicas"] == [] and h.ports() == []
    assert status["state"] == "failed" and ("failed", status["reason"]) in h.events()
    assert len(h.engines) == 3
    # The next request loads the model again.
    await asyncio.wait_for(h.manager.acquire("m"), 5)
    h.manager.release("m")
    assert h.manager.status("m")["state"] == "ready" and len(h.engines) == 4
    await h.manager.close()


def test_the_backoff_doubles_up_to_its_ceiling() -> None:
    settings = RestartSettings(backoff_s=2, backoff_max_s=10)
    assert [settings.backoff(n) for n in (1, 2, 3, 4)] == [2, 4, 8, 10]
