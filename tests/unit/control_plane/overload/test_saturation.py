"""The saturation decision: thresholds per level, hysteresis (a clear margin and a hold time), one step
down at a time, stale signals failing open, a model's own thresholds over the registry's."""

from __future__ import annotations

import pytest

from control_plane.config.overload import OverloadSettings, Thresholds
from control_plane.overload.saturation import SaturationTracker, model_load, model_thresholds
from control_plane.telemetry.signals import EndpointSignals

pytestmark = pytest.mark.unit

SETTINGS = OverloadSettings(
    saturated=Thresholds(queue_per_replica=8, kv_cache=0.95),
    severe=Thresholds(queue_per_replica=32),
    clear_ratio=0.5,
    hold_s=5,
)
GROUPS = {"m": ["m-0", "m-1"]}


def signals(now: float, *queues: float, kv: float | None = None) -> dict[str, EndpointSignals]:
    return {
        f"m-{i}": EndpointSignals(scraped_at=now, queue_depth=q, kv_cache_usage=kv)
        for i, q in enumerate(queues)
    }


def step(tracker: SaturationTracker, now: float, *queues: float, kv: float | None = None) -> int:
    levels = tracker.update(GROUPS, signals(now, *queues, kv=kv), {}, SETTINGS, now, max_age_s=10)
    return levels.get("m", 0)


def test_the_mean_queue_per_replica_and_kv_cache_use() -> None:
    load = model_load(signals(0, 4, 12, kv=0.5).values(), now=1, max_age_s=10)
    assert (load.replicas, load.queue_per_replica, load.kv_cache) == (2, 8, 0.5)
    stale = model_load(signals(0, 40, 40).values(), now=11, max_age_s=10)
    assert stale.replicas == 0 and stale.queue_per_replica is None


def test_levels_are_entered_at_once() -> None:
    tracker = SaturationTracker()
    assert step(tracker, 0, 2, 4) == 0
    assert step(tracker, 1, 6, 10) == 1  # mean 8: saturated
    assert step(tracker, 2, 30, 40) == 2  # mean 35: severe
    assert step(SaturationTracker(), 0, 0, 0, kv=0.96) == 1  # the KV cache alone


def test_hysteresis_holds_then_lowers_one_step_at_a_time() -> None:
    tracker = SaturationTracker()
    assert step(tracker, 0, 40, 40) == 2
    assert step(tracker, 1, 0, 0) == 2  # held for hold_s
    assert step(tracker, 6, 20, 20) == 2  # under severe (32) but not under 32 times 0.5
    assert step(tracker, 7, 10, 10) == 1  # under 16: one step down, held again
    assert step(tracker, 8, 0, 0) == 1
    assert step(tracker, 12.5, 5, 5) == 1  # 5 >= 8 times 0.5: not clearly clear
    assert step(tracker, 13, 3, 3) == 0
    assert step(tracker, 14, 8, 8) == 1  # back up at once


def test_no_fresh_signals_fail_open() -> None:
    tracker = SaturationTracker()
    assert step(tracker, 0, 40, 40) == 2
    levels = tracker.update(GROUPS, {}, {}, SETTINGS, now=6, max_age_s=10)
    assert levels == {"m": 1}
    assert tracker.update(GROUPS, {}, {}, SETTINGS, now=12, max_age_s=10) == {}


def test_a_models_own_thresholds_and_gone_models() -> None:
    own = model_thresholds({"m": (Thresholds(queue_per_replica=2), None), "n": (None, None)}, SETTINGS)
    assert own["m"] == (Thresholds(queue_per_replica=2), SETTINGS.severe)
    assert own["n"] == (SETTINGS.saturated, SETTINGS.severe)
    tracker = SaturationTracker()
    assert tracker.update(GROUPS, signals(0, 3, 3), own, SETTINGS, 0, 10) == {"m": 1}
    assert tracker.update({}, {}, own, SETTINGS, 1, 10) == {}
    assert tracker.loads() == {}
