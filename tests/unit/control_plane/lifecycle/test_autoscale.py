"""The default autoscaling policy over time (an injected clock): sustained load adds one replica, a brief
spike does not; a replica still loading holds the next step back; low load removes one after the cooldown,
never below the minimum nor above the maximum. And the settings' validation names the path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from control_plane.config.lifecycle import LaunchSettings
from control_plane.config.schema import Registry
from control_plane.lifecycle.autoscale import (
    QueueDepthPolicy,
    ReplicaSignalReader,
    ScalingSignals,
    bounds,
)
from control_plane.lifecycle.manager import LifecycleManager
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.telemetry.scraper import TelemetryScraper

pytestmark = pytest.mark.unit


def launch(**autoscale: Any) -> LaunchSettings:
    targets = {"target_queue_depth": 2, "scale_up_after_s": 10, "scale_down_cooldown_s": 30, **autoscale}
    return LaunchSettings(min_replicas=1, max_replicas=3, autoscale=targets)


class Run:
    """Feeds the policy one reading a second and applies its answer at once (replicas ready instantly)."""

    def __init__(self, settings: LaunchSettings, replicas: int = 1) -> None:
        self.policy = QueueDepthPolicy()
        self.settings = settings
        self.replicas = replicas
        self.now = 0.0
        self.history: list[int] = []

    def step(self, seconds: int, loading: int = 0, **signals: Any) -> int:
        for _ in range(seconds):
            self.now += 1
            reading = ScalingSignals(at=self.now, ready=self.replicas, loading=loading, **signals)
            self.replicas = self.policy.desired("m", reading, self.settings) - loading
            self.history.append(self.replicas)
        return self.replicas


def test_sustained_queue_adds_one_replica_after_scale_up_after_s() -> None:
    run = Run(launch())
    assert run.step(10, queue_depth=10) == 1  # above target from the first reading: 9 s, not yet
    assert run.step(1, queue_depth=10) == 2  # 10 s: one more
    assert run.step(9, queue_depth=10) == 2  # the next step needs another 10 s above target
    assert run.step(1, queue_depth=10) == 3
    assert run.step(30, queue_depth=100) == 3  # max_replicas


def test_brief_spikes_do_not_scale() -> None:
    run = Run(launch())
    for _ in range(5):
        run.step(8, queue_depth=10)
        run.step(1, queue_depth=0)  # each spike broken before scale_up_after_s
    assert set(run.history) == {1}


def test_the_queue_target_is_per_ready_replica() -> None:
    run = Run(launch(), replicas=2)
    assert run.step(20, queue_depth=4) == 2  # 2 per replica: at target, not above; and not low enough
    assert run.step(10, queue_depth=5) == 2
    assert run.step(1, queue_depth=5) == 3


def test_a_loading_replica_holds_the_next_step_back() -> None:
    run = Run(launch())
    assert run.step(11, queue_depth=10) == 2
    run.replicas = 1  # one ready, the added one loading
    assert run.step(20, loading=1, queue_depth=10) == 1  # no second step while it loads
    run.replicas = 2  # it is ready
    assert run.step(9, queue_depth=10) == 2  # the period counts from its readiness
    assert run.step(1, queue_depth=10) == 3


def test_low_load_removes_one_replica_per_cooldown_never_below_min() -> None:
    run = Run(launch(), replicas=3)
    assert run.step(30, queue_depth=0) == 3  # low from the first reading: 29 s
    assert run.step(1, queue_depth=0) == 2
    assert run.step(29, queue_depth=0) == 2
    assert run.step(1, queue_depth=0) == 1
    assert run.step(120, queue_depth=0) == 1  # min_replicas


def test_no_scale_down_within_the_cooldown_of_a_scale_up() -> None:
    run = Run(launch(scale_up_after_s=2, scale_down_cooldown_s=30))
    assert run.step(3, queue_depth=10) == 2
    assert run.step(30, queue_depth=0) == 2
    assert run.step(1, queue_depth=0) == 1


def test_load_that_would_not_fit_one_replica_fewer_keeps_them() -> None:
    run = Run(launch(), replicas=2)
    assert run.step(120, queue_depth=3) == 2  # 1.5 per replica: below target, but 3 > 2 on one replica


def test_unknown_signals_keep_the_count() -> None:
    run = Run(launch(), replicas=2)
    assert run.step(120) == 2  # no queue depth read (scrapes failed): no evidence either way


def test_ttft_and_in_flight_targets() -> None:
    ttft = Run(launch(target_queue_depth=None, target_ttft_s=0.5))
    assert ttft.step(11, ttft_s=2.0) == 2
    assert ttft.step(30, ttft_s=0.2) == 2
    assert ttft.step(1, ttft_s=0.2) == 1  # 0.2 <= 0.5 * 1/2: fits one replica
    in_flight = Run(launch(target_queue_depth=None, target_in_flight=8))
    assert in_flight.step(11, in_flight=20) == 2
    assert in_flight.step(60, in_flight=10) == 2  # 10 > 8 on one replica
    assert in_flight.step(31, in_flight=4) == 1


def test_counts_outside_the_bounds_are_brought_back_at_once() -> None:
    settings = launch()
    policy = QueueDepthPolicy()
    assert policy.desired("m", ScalingSignals(at=0, ready=5), settings) == 3
    assert policy.desired("m", ScalingSignals(at=0, ready=0), settings) == 1
    assert bounds(LaunchSettings()) == (1, 1)
    assert bounds(LaunchSettings(min_replicas=2, max_replicas=4)) == (2, 4)


def test_forget_drops_the_trend() -> None:
    run = Run(launch())
    run.step(9, queue_depth=10)
    run.policy.forget("m")
    assert run.step(9, queue_depth=10) == 1  # started over


@pytest.mark.parametrize(
    ("launch_doc", "path", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "models.0.launch", "min_replicas (3) must not exceed"),
        ({"max_replicas": 0}, "models.0.launch.max_replicas", "greater than or equal to 1"),
        ({"autoscale": {"target_queue_depth": None}}, "models.0.launch.autoscale", "at least one of"),
        ({"autoscale": {"scale_up_after_s": -1}}, "models.0.launch.autoscale.scale_up_after_s", "greater"),
    ],
)
def test_settings_errors_name_the_path(launch_doc: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Registry.model_validate({"models": [{"id": "m", "engine": "vllm", "launch": launch_doc}]})
    errors = caught.value.errors()
    assert ".".join(str(p) for p in errors[0]["loc"]) == path
    assert message in errors[0]["msg"]


# The manager with replicas, over fake engines: the minimum, the desired count, the budget.


class FakeEngine:
    def __init__(self) -> None:
        self.running = False

    async def start(self) -> None:
        self.running = True

    async def wait_ready(self, timeout_s: float) -> None:
        await asyncio.sleep(0)

    async def stop(self, grace_s: float) -> None:
        self.running = False

    def on_exit(self, callback: Any) -> None:
        pass


class FixedPolicy:
    def __init__(self) -> None:
        self.wanted: dict[str, int] = {}

    def desired(self, model_id: str, signals: ScalingSignals, launch: LaunchSettings) -> int:
        low, high = bounds(launch)
        return min(max(self.wanted.get(model_id, low), low), high)

    def forget(self, model_id: str) -> None:
        pass


class NoSignals(ReplicaSignalReader):
    async def read(
        self, engine: str, addresses: Sequence[str], loading: int, held: int, gpus: Sequence[int] = ()
    ) -> ScalingSignals:
        return ScalingSignals(at=time.monotonic(), ready=len(addresses), loading=loading)


def _registry(budget: int | None, **launches: dict[str, Any]) -> Registry:
    models = [
        {"id": name, "engine": "vllm", "launch": {"memory_mb": 1000, **doc}} for name, doc in launches.items()
    ]
    return Registry.model_validate({"lifecycle": {"gpu_memory_mb": budget}, "models": models})


async def _settle(manager: LifecycleManager, until: Any, passes: int = 100) -> None:
    for _ in range(passes):
        await manager.tick()
        await asyncio.sleep(0.02)
        if until():
            return
    raise AssertionError("not reached")


def _manager(policy: FixedPolicy) -> tuple[LifecycleManager, dict[str, tuple[Any, ...]]]:
    published: dict[str, tuple[Any, ...]] = {}
    ports = iter(range(30000, 31000))
    manager = LifecycleManager(
        lambda model_id, replicas: published.__setitem__(model_id, replicas),
        lambda spec, model: FakeEngine(),
        metrics=LifecycleMetrics.create(CollectorRegistry()),
        free_port=lambda: next(ports),
        report_interval_s=0.01,
        policy=policy,
        signals=NoSignals(TelemetryScraper(), lambda address: 0, time.monotonic),
    )
    return manager, published


def test_the_minimum_loads_without_a_request_and_the_desired_count_is_reached() -> None:
    asyncio.run(_minimum_and_desired())


async def _minimum_and_desired() -> None:
    policy = FixedPolicy()
    manager, published = _manager(policy)
    await manager.follow(_registry(None, a={"min_replicas": 2, "max_replicas": 3}))
    await _settle(manager, lambda: len(published.get("a", ())) == 2)
    assert manager.status("a")["state"] == "ready" and manager.budget()["used_mb"] == 2000
    policy.wanted["a"] = 3
    await _settle(manager, lambda: len(published["a"]) == 3)
    policy.wanted["a"] = 1  # below the minimum: kept at 2
    await _settle(manager, lambda: len(manager.status("a")["replicas"]) == 2)
    await asyncio.sleep(0.2)
    await manager.tick()
    assert len(published["a"]) == 2 and manager.status("a")["desired_replicas"] == 2
    await manager.close()


def test_the_budget_takes_replicas_above_a_minimum_before_whole_models() -> None:
    asyncio.run(_budget())


async def _budget() -> None:
    policy = FixedPolicy()
    manager, published = _manager(policy)
    policy.wanted["a"] = 2
    await manager.follow(_registry(2000, a={"min_replicas": 1, "max_replicas": 2}, b={}, c={}))
    await _settle(manager, lambda: len(published.get("a", ())) == 2)
    await manager.load("b")  # no room: a gives up the replica above its minimum
    assert len(manager.status("a")["replicas"]) == 1 and manager.status("b")["state"] == "ready"
    await manager.load("c")  # a is at its minimum: b (no minimum) is unloaded
    assert manager.status("b")["state"] == "cold" and manager.status("a")["state"] == "ready"
    # a still wants 2: its scale-up may evict c, idle and unpinned (a busy one would stay).
    await _settle(manager, lambda: len(published["a"]) == 2)
    assert manager.status("c")["state"] == "cold" and manager.budget()["used_mb"] == 2000
    events = [e["event"] for e in manager.events()]
    assert "replica stopped" in events and events.count("unloaded") == 2
    await manager.close()
