"""Scorers: each maps signals to [0, 1] (1 = most capacity) or None without its signals."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.balancing.scorers import (
    FleetView,
    GpuMemoryScorer,
    KvCacheScorer,
    LatencyScorer,
    QueueScorer,
    Scorer,
)
from control_plane.telemetry.signals import EndpointSignals

pytestmark = pytest.mark.unit


def sig(**kwargs: Any) -> EndpointSignals:
    return EndpointSignals(scraped_at=0.0, **kwargs)


def test_scorers_satisfy_the_protocol():
    scorers: list[Scorer] = [QueueScorer(), KvCacheScorer(), LatencyScorer(), GpuMemoryScorer()]
    assert [s.name for s in scorers] == ["queue", "kv_cache", "latency", "gpu_memory"]
    for scorer in scorers:
        assert scorer.score(sig()) is None  # no signals, no score


def test_queue_scorer_absolute_and_fleet_relative():
    scorer = QueueScorer(scale=4.0)
    assert scorer.score(sig(queue_depth=0)) == 1.0
    assert scorer.score(sig(queue_depth=4)) == pytest.approx(0.5)  # 1 / (1 + queue / scale)
    assert scorer.score(sig(queue_depth=-1)) == 1.0
    fleet = FleetView([sig(queue_depth=10), sig(queue_depth=20), sig(queue_depth=38)])  # best: 10
    assert scorer.score(sig(queue_depth=10), fleet) == 1.0
    assert scorer.score(sig(queue_depth=24), fleet) == pytest.approx(0.5)
    assert scorer.score(sig(queue_depth=52), fleet) == pytest.approx(0.25)
    # An equally queued fleet scores 1 everywhere, whatever the absolute depth.
    assert scorer.score(sig(queue_depth=30), FleetView([sig(queue_depth=30)] * 3)) == 1.0
    # One hopelessly queued replica is not bounded below by the fleet it drags up.
    hopeless = scorer.score(sig(queue_depth=1e9), FleetView([sig(queue_depth=0), sig(queue_depth=1e9)]))
    assert hopeless is not None and hopeless < 1e-8
    with pytest.raises(ValueError):
        QueueScorer(scale=0)


def test_kv_cache_scorer():
    scorer = KvCacheScorer()
    assert scorer.score(sig(kv_cache_usage=0.25)) == pytest.approx(0.75)
    assert scorer.score(sig(kv_cache_usage=1.2)) == 0.0
    assert scorer.score(sig(kv_cache_usage=float("nan"))) is None


def test_latency_scorer_prefers_time_per_token_and_compares_with_the_fleet_best():
    scorer = LatencyScorer()
    fast = sig(time_per_token_seconds_mean=0.02, e2e_seconds_mean=9.0)
    slow = sig(time_per_token_seconds_mean=0.06, e2e_seconds_mean=1.0)
    fleet = FleetView([fast, slow])
    assert scorer.score(fast, fleet) == 1.0
    assert scorer.score(slow, fleet) == pytest.approx(1 / 3)  # e2e (shorter answers) is not used
    # Only e2e known: compared with the fleet's best e2e.
    e2e_only = sig(e2e_seconds_mean=2.0)
    assert scorer.score(e2e_only, fleet) == pytest.approx(0.5)
    # No fleet: needs an absolute reference.
    assert scorer.score(slow) is None
    assert LatencyScorer(reference_s=0.03).score(slow) == pytest.approx(0.5)
    assert LatencyScorer(reference_s=0.03).score(sig(time_per_token_seconds_mean=0.0)) == 1.0
    assert LatencyScorer(fields=("ttft_seconds_mean",)).score(slow, fleet) is None


def test_gpu_memory_scorer():
    assert GpuMemoryScorer().score(sig(gpu_memory_used_bytes=3.0, gpu_memory_free_bytes=1.0)) == 0.25
    assert GpuMemoryScorer().score(sig(gpu_memory_used_bytes=3.0)) is None


def test_fleet_view():
    fleet = FleetView(
        [sig(queue_depth=1), sig(queue_depth=None), sig(queue_depth=3), sig(queue_depth=float("inf"))]
    )
    assert len(fleet) == 4
    assert fleet.values("queue_depth") == [1.0, 3.0]
    assert (fleet.mean("queue_depth"), fleet.min("queue_depth"), fleet.max("queue_depth")) == (2.0, 1.0, 3.0)
    assert fleet.mean("kv_cache_usage") is None
