"""Retries cannot multiply load on a fleet that is merely overloaded (64 closed-loop clients, two replicas).

The retry budget is large enough to move a dead replica's whole share (test_failover.py); what keeps
retries from feeding an overload is which causes are retried: an engine that says it is full (503 here,
TGI's 429) is not retried, the circuit breaker's own refusal is not retried and caps retries too, and a
try that goes silent on a slow fleet is retried at most `timeout_retries` times.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.closed_loop import closed_loop, envoy_counters, sim_state
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

CLIENTS = 64
COUNTERS = (
    "upstream_rq_total",
    "upstream_rq_retry",
    "upstream_rq_pending_overflow",
    "upstream_rq_per_try_idle_timeout",
)


def _engine_requests(ports: list[int]) -> int:
    """Requests the simulators received, refused ones included."""
    return sum(int(sim_state(p)["requests"]) for p in ports)


def _fleet(
    make_stack: StackFactory, sim_args: list[str], **models: dict[str, Any]
) -> tuple[Any, dict[str, list[int]]]:
    ports = {name: [free_port(), free_port()] for name in models}
    doc = registry(*(model(name, "vllm", ports[name], **extra) for name, extra in models.items()))
    extra_args = {f"{name}-{i}": sim_args for name in models for i in range(2)}
    return make_stack(doc, sim_extra_args=extra_args), ports


def _delta(admin_url: str, cluster: str, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in envoy_counters(admin_url, cluster, COUNTERS).items()}


def test_engines_that_answer_full_are_not_retried(make_stack: StackFactory) -> None:
    """Each engine runs 4 and queues 4: most of the 64 clients' requests are refused with 503. Each one
    reached exactly one engine once: no retry, so the engines see exactly the clients' requests."""
    sim_args = ["--decode-ms-per-token", "30", "--max-batch", "4", "--max-queue", "4"]
    stack, ports = _fleet(make_stack, sim_args, full={})
    envoy = stack.envoys[0]
    engines_before = _engine_requests(ports["full"])
    before = envoy_counters(envoy.admin_url, "model_full", COUNTERS)
    run = closed_loop(envoy.url, "full", clients=CLIENTS, duration_s=3.0)
    delta = _delta(envoy.admin_url, "model_full", before)
    engines = _engine_requests(ports["full"]) - engines_before

    statuses = run.statuses()
    assert statuses[200] > 0 and statuses[503] > statuses[200], statuses  # the fleet was overloaded
    assert set(statuses) == {200, 503}, run.failures()
    assert delta["upstream_rq_retry"] == 0, delta
    assert engines == len(run.outcomes) == delta["upstream_rq_total"], (engines, len(run.outcomes), delta)


def test_circuit_breaker_caps_the_fleet_and_is_not_retried(make_stack: StackFactory) -> None:
    """max_concurrent_requests 8 and 4 pending (a new upstream connection waits as pending, so 0 would
    refuse everything): the requests over the limit are answered model_overloaded by Envoy at once,
    never retried, and the engines never hold more than 8."""
    sim_args = ["--decode-ms-per-token", "30", "--max-batch", "64"]
    limits = {"max_concurrent_requests": 8, "max_pending_requests": 4}
    stack, ports = _fleet(make_stack, sim_args, capped={"limits": limits})
    envoy = stack.envoys[0]
    peaks: list[int] = []
    done = threading.Event()

    def watch() -> None:  # the engines' own view of how many requests they hold
        while not done.is_set():
            peaks.append(sum(int(s["running"]) + int(s["queue"]) for s in map(sim_state, ports["capped"])))
            time.sleep(0.02)

    before = envoy_counters(envoy.admin_url, "model_capped", COUNTERS)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run = closed_loop(envoy.url, "capped", clients=CLIENTS, duration_s=3.0)
    finally:
        done.set()
        watcher.join(timeout=10)
    delta = _delta(envoy.admin_url, "model_capped", before)

    statuses = run.statuses()
    assert statuses[200] > 0 and set(statuses) == {200, 503}, run.failures()
    assert set(run.codes()) == {"model_overloaded"}, run.codes()
    assert delta["upstream_rq_pending_overflow"] == statuses[503], delta
    assert delta["upstream_rq_retry"] == 0, delta
    # The two engines are read one after the other, not at one instant: one request may have moved on.
    assert peaks and max(peaks) <= 8 + 1, max(peaks)


def test_a_slow_fleet_gets_at_most_timeout_retries_more_requests(make_stack: StackFactory) -> None:
    """Every answer takes longer than two idle timeouts. With the default `timeout_retries: 1` each
    request is tried at most twice (then 504 upstream_timeout); with 0, exactly once."""
    sim_args = ["--decode-ms-per-token", "150", "--max-batch", "64"]
    limits = {"idle_timeout_s": 1.0}
    stack, ports = _fleet(
        make_stack,
        sim_args,
        slow={"limits": limits},
        slow0={"limits": limits, "retry": {"timeout_retries": 0}},
    )
    envoy = stack.envoys[0]
    seen = {}
    for name in ("slow", "slow0"):
        engines_before = _engine_requests(ports[name])
        before = envoy_counters(envoy.admin_url, f"model_{name}", COUNTERS)
        run = closed_loop(envoy.url, name, clients=CLIENTS, duration_s=2.5, timeout_s=30)
        delta = _delta(envoy.admin_url, f"model_{name}", before)
        engines = _engine_requests(ports[name]) - engines_before
        assert run.statuses() == {504: len(run.outcomes)}, run.failures()
        assert set(run.codes()) == {"upstream_timeout"}, run.codes()
        assert engines == delta["upstream_rq_total"], (engines, delta)
        seen[name] = (len(run.outcomes), engines, delta)

    requests, engines, delta = seen["slow"]
    assert delta["upstream_rq_retry"] > 0, delta  # the silent tries were retried ...
    assert delta["upstream_rq_retry"] <= requests and engines <= 2 * requests, seen  # ... once at most
    requests, engines, delta = seen["slow0"]
    assert delta["upstream_rq_retry"] == 0 and engines == requests, seen
