"""WeightPolicy (signals → integer weights), WeightController (hysteresis, rate limit), the registry."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest

from backends.simulator.app import build_app, start_server
from backends.simulator.config import make_config
from control_plane.balancing.policy import (
    UnknownPolicyError,
    WeightController,
    WeightPolicy,
    make_policy,
    policy_names,
)
from control_plane.balancing.scorers import KvCacheScorer, LatencyScorer, QueueScorer
from control_plane.errors import GatewayError
from control_plane.telemetry.scraper import TelemetryScraper
from control_plane.telemetry.signals import EndpointSignals

pytestmark = pytest.mark.unit

NOW = 1000.0
MAX_AGE = 6.0


def sig(age: float = 0.0, **kwargs: Any) -> EndpointSignals:
    return EndpointSignals(scraped_at=NOW - age, **kwargs)


def telemetry() -> WeightPolicy:
    policy = make_policy("telemetry")
    assert policy is not None
    return policy


def queue_only() -> WeightPolicy:
    policy = make_policy("queue")
    assert policy is not None
    return policy


FAST = sig(queue_depth=0, kv_cache_usage=0.3, time_per_token_seconds_mean=0.02)
SLOW = sig(queue_depth=6, kv_cache_usage=0.9, time_per_token_seconds_mean=0.06)  # 3x slower, deeper queue


def test_slower_deeper_queued_endpoint_gets_a_clearly_lower_weight():
    weights = telemetry().weights({"a": FAST, "b": SLOW}, {"a": 1, "b": 1}, NOW, MAX_AGE)
    assert weights["a"] == 100
    assert weights["b"] <= 35


def test_queue_policy_and_only_latency_differs():
    queue = make_policy("queue")
    assert queue is not None
    weights = queue.weights(
        {"a": sig(queue_depth=0), "b": sig(queue_depth=9)}, {"a": 1, "b": 1}, NOW, MAX_AGE
    )
    assert weights == {"a": 100, "b": 31}  # (4 + 0) / (4 + 9)
    latency_only = WeightPolicy([(LatencyScorer(), 1.0)])
    weights = latency_only.weights(
        {"a": sig(time_per_token_seconds_mean=0.01), "b": sig(time_per_token_seconds_mean=0.03)},
        {"a": 1, "b": 1},
        NOW,
        MAX_AGE,
    )
    assert weights == {"a": 100, "b": 33}


def test_stale_and_missing_signals_are_neutral():
    static = {"a": 1, "b": 1, "c": 1, "d": 1}
    signals = {"a": FAST, "b": SLOW, "c": sig(age=MAX_AGE + 1, queue_depth=50), "d": None}
    policy = telemetry()
    weights = policy.weights(signals, static, NOW, MAX_AGE)
    scores = policy.evaluate(signals, list(static), NOW, MAX_AGE)
    assert (scores["c"].reason, scores["d"].reason) == ("stale", "missing")
    assert scores["a"].reason == "scored" and dict(scores["a"].by_scorer)["queue"] == 1.0
    # Neutral: the mean score of the scored peers, so between the two, neither favoured nor starved.
    assert weights["b"] < weights["c"] == weights["d"] < weights["a"] == 100
    a, b = scores["a"].score, scores["b"].score
    assert a is not None and b is not None
    assert weights["c"] == round((a + b) / 2 / a * 100)


def test_stale_neutral_keeps_its_static_ratio():
    # With equal scores everywhere, a stale endpoint's weight is its static weight, on the policy's scale.
    signals = {"a": sig(queue_depth=0), "b": sig(age=60, queue_depth=0)}
    weights = telemetry().weights(signals, {"a": 2, "b": 1}, NOW, MAX_AGE)
    assert weights == {"a": 100, "b": 50}


def test_all_missing_or_stale_gives_static_weights_unchanged():
    static = {"a": 3, "b": 1, "c": 250}
    policy = telemetry()
    assert policy.weights({}, static, NOW, MAX_AGE) == static
    stale = {e: sig(age=MAX_AGE + 0.5, queue_depth=1) for e in static}
    assert policy.weights(stale, static, NOW, MAX_AGE) == static
    # Signals no scorer can use (an engine without queue, KV or latency metrics) are neutral too.
    unscorable = {e: sig(gpu_utilization=0.5) for e in static}
    assert policy.weights(unscorable, static, NOW, MAX_AGE) == static
    assert policy.evaluate(unscorable, list(static), NOW, MAX_AGE)["a"].reason == "unscorable"


def test_static_weights_scale_the_result_and_unknown_endpoints_are_ignored():
    signals = {"a": sig(queue_depth=0), "b": sig(queue_depth=0), "zombie": sig(queue_depth=100)}
    assert telemetry().weights(signals, {"a": 1, "b": 3}, NOW, MAX_AGE) == {"a": 33, "b": 100}


def test_bounds_are_respected():
    rng = random.Random(7)
    for max_weight in (1, 10, 100, 1000):
        policy = make_policy("telemetry", max_weight=max_weight)
        assert policy is not None
        for _ in range(200):
            static = {f"e{i}": rng.randint(1, 50) for i in range(rng.randint(1, 6))}
            signals: dict[str, EndpointSignals | None] = {
                e: rng.choice(
                    [
                        None,
                        sig(age=rng.uniform(0, 2 * MAX_AGE)),
                        sig(
                            queue_depth=rng.choice([0, 1, 5, 1e9]),
                            kv_cache_usage=rng.choice([None, 0.0, 0.5, 1.0]),
                            time_per_token_seconds_mean=rng.choice([None, 0.001, 0.1, 10.0]),
                        ),
                    ]
                )
                for e in static
            }
            weights = policy.weights(signals, static, NOW, MAX_AGE)
            assert set(weights) == set(static)
            if weights != static:
                assert all(isinstance(w, int) and 1 <= w <= max_weight for w in weights.values())
                assert max(weights.values()) == max_weight


def test_hopelessly_overloaded_endpoint_keeps_weight_one():
    signals = {"a": sig(queue_depth=0, kv_cache_usage=0.0), "b": sig(queue_depth=1e9, kv_cache_usage=1.0)}
    weights = WeightPolicy([(QueueScorer(), 1.0), (KvCacheScorer(), 1.0)]).weights(
        signals, {"a": 1, "b": 1}, NOW, MAX_AGE
    )
    assert weights == {"a": 100, "b": 1}
    # Everyone at zero: nothing tells them apart, static proportions.
    full = {"a": sig(kv_cache_usage=1.0), "b": sig(kv_cache_usage=1.0)}
    assert WeightPolicy([(KvCacheScorer(), 1.0)]).weights(full, {"a": 1, "b": 2}, NOW, MAX_AGE) == {
        "a": 50,
        "b": 100,
    }


def test_groups_are_scaled_separately():
    signals = {"l-0": sig(queue_depth=4), "l-1": sig(queue_depth=4), "q-0": sig(queue_depth=0), "q-1": SLOW}
    static = {"l-0": 1, "l-1": 1, "q-0": 1, "q-1": 1, "loner": 1}
    weights = queue_only().weights_for_groups(
        {"llama": ["l-0", "l-1"], "qwen": ["q-0", "q-1", "ghost"]}, signals, static, NOW, MAX_AGE
    )
    assert weights["l-0"] == weights["l-1"] == 100  # equally loaded: equal, whatever the absolute load
    assert weights["q-0"] == 100 and weights["q-1"] < 50
    assert weights["loner"] == 1  # in no group and without signals: static
    assert "ghost" not in weights


def test_policy_registry():
    assert policy_names() == ("none", "queue", "telemetry")
    assert make_policy("none") is None
    queue = make_policy("queue", max_weight=50)
    assert queue is not None and queue.max_weight == 50 and [s.name for s, _ in queue.scorers] == ["queue"]
    assert [s.name for s, _ in telemetry().scorers] == ["queue", "kv_cache", "latency"]
    assert "telemetry" in repr(telemetry())
    with pytest.raises(UnknownPolicyError, match="choose one of none, queue, telemetry") as info:
        make_policy("round-robin")
    assert isinstance(info.value, GatewayError) and isinstance(info.value, ValueError)


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError):
        WeightPolicy([])
    with pytest.raises(ValueError):
        WeightPolicy([(QueueScorer(), 0.0)])
    with pytest.raises(ValueError):
        WeightPolicy([(QueueScorer(), 1.0)], max_weight=0)
    with pytest.raises(ValueError):
        WeightController(telemetry(), min_interval_s=-1)
    with pytest.raises(ValueError):
        WeightController(telemetry(), hysteresis=-0.1)


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def queues(a: float, b: float, at: float) -> dict[str, EndpointSignals | None]:
    return {
        "a": EndpointSignals(scraped_at=at, queue_depth=a),
        "b": EndpointSignals(scraped_at=at, queue_depth=b),
    }


def test_controller_hysteresis_and_min_interval():
    clock = FakeClock()
    controller = WeightController(queue_only(), min_interval_s=2.0, hysteresis=0.2, clock=clock)
    static = {"a": 1, "b": 1}

    # Nothing to tell apart: the static weights stand, nothing is published.
    assert controller.update(queues(0, 0, clock.now), static) is None
    assert controller.current is None

    first = controller.update(queues(0, 9, clock.now), static)
    assert first == {"a": 100, "b": 31}
    assert controller.current == first

    # A big move within min_interval of the last publication is held back...
    clock.now += 0.5
    assert controller.update(queues(0, 2, clock.now), static) is None
    clock.now += 1.0
    assert controller.update(queues(0, 2, clock.now), static) is None
    # ...and published once the interval has passed since that publication.
    clock.now += 0.5
    second = controller.update(queues(0, 2, clock.now), static)
    assert second == {"a": 100, "b": 67}
    # A small move (67 → 57 is 15 %) is noise: suppressed, even much later.
    clock.now += 10
    assert controller.update(queues(0, 3, clock.now), static) is None
    assert controller.current == second
    # A big move long after the last publication goes out at once...
    assert controller.update(queues(0, 30, clock.now), static) == {"a": 100, "b": 12}
    # ...and the next one, right after it, waits for the interval.
    clock.now += 1.9
    assert controller.update(queues(0, 4, clock.now), static) is None
    clock.now += 0.1
    assert controller.update(queues(0, 4, clock.now), static) == {"a": 100, "b": 50}

    # An explicit `now` overrides the clock (freshness and interval alike).
    later = clock.now + 5
    assert controller.update(queues(0, 0, later), static, now=later) == {"a": 100, "b": 100}


def test_controller_publishes_endpoint_set_and_static_changes_at_once():
    clock = FakeClock()
    controller = WeightController(telemetry(), min_interval_s=60.0, hysteresis=0.5, clock=clock)
    assert controller.update({"a": FAST, "b": SLOW}, {"a": 1, "b": 1}) is not None
    clock.now += 0.1
    # A new endpoint: published at once, so it is not compared at its static weight 1 against 100s.
    grown = controller.update({"a": FAST, "b": SLOW}, {"a": 1, "b": 1, "c": 1})
    assert grown is not None and set(grown) == {"a", "b", "c"} and grown["c"] > grown["b"]
    clock.now += 0.1
    # A static weight changed in the registry: published at once too.
    changed = controller.update({"a": FAST, "b": SLOW}, {"a": 1, "b": 1, "c": 2})
    assert changed is not None and changed["c"] == 100
    clock.now += 0.1
    shrunk = controller.update({"a": FAST, "b": SLOW}, {"a": 1, "b": 1})
    assert shrunk is not None and set(shrunk) == {"a", "b"}


def test_controller_falls_back_to_static_when_telemetry_goes_stale():
    clock = FakeClock()
    controller = WeightController(
        telemetry(), min_interval_s=2.0, hysteresis=0.2, max_age_s=MAX_AGE, clock=clock
    )
    signals = {"a": FAST, "b": SLOW}
    assert controller.update(signals, {"a": 1, "b": 1}) is not None
    clock.now += MAX_AGE + 1  # no scrape since: every signal is stale
    assert controller.update(signals, {"a": 1, "b": 1}) == {"a": 1, "b": 1}
    assert controller.update(signals, {"a": 1, "b": 1}) is None
    controller.reset()
    assert controller.current is None


def test_controller_with_groups_and_zero_settings():
    controller = WeightController(queue_only(), min_interval_s=0, hysteresis=0)
    signals = {"a": sig(queue_depth=0), "b": sig(queue_depth=1)}
    first = controller.update(signals, {"a": 1, "b": 1}, now=NOW, groups={"m": ["a", "b"]})
    assert first == {"a": 100, "b": 80}
    # hysteresis 0 and no interval: any change is published.
    second = controller.update(
        {"a": sig(queue_depth=0), "b": sig(queue_depth=1.1)},
        {"a": 1, "b": 1},
        now=NOW,
        groups={"m": ["a", "b"]},
    )
    assert second == {"a": 100, "b": 78}


def test_weights_from_scraped_simulators():
    """End to end without Envoy: two simulated vLLM replicas, one three times slower, scraped before and
    after the same work; the latency policy gives the slow one about a third of the weight."""

    async def run(url: str, session: aiohttp.ClientSession) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        for _ in range(3):
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                await response.read()

    async def main() -> dict[str, int]:
        servers = []
        for endpoint_id, slowdown in (("fast", 1.0), ("slow", 3.0)):
            config = make_config(
                "vllm", "m", endpoint_id, profile="fast", decode_ms_per_token=8.0, slowdown=slowdown
            )
            servers.append(await start_server(build_app(config, exit_process=lambda code: None)))
        try:
            urls = {"fast": servers[0].url, "slow": servers[1].url}
            async with TelemetryScraper() as scraper, aiohttp.ClientSession() as session:
                before = {e: await scraper.scrape(f"{u}/metrics", "vllm") for e, u in urls.items()}
                await asyncio.gather(*(run(u, session) for u in urls.values()))
                after = {
                    e: await scraper.scrape(f"{u}/metrics", "vllm", previous=before[e])
                    for e, u in urls.items()
                }
            now = max(s.scraped_at for s in after.values())
            fast, slow = after["fast"].time_per_token_seconds_mean, after["slow"].time_per_token_seconds_mean
            assert fast is not None and slow is not None and slow > 2 * fast
            return WeightPolicy([(LatencyScorer(), 1.0)]).weights(after, {"fast": 1, "slow": 1}, now, 10.0)
        finally:
            for server in servers:
                await server.stop()

    weights = asyncio.run(main())
    assert weights["fast"] == 100
    assert 20 <= weights["slow"] <= 50
