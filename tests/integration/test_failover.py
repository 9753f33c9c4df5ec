"""A replica that dies or hangs under real concurrency loses no non-streaming request, and every failure
the gateway answers itself names its cause.

64 closed-loop clients on two replicas put about 32 requests in flight on each (the generations last about
half a second): when one is SIGKILLed or SIGSTOPped, all of its share must be retried on the other one,
at the same moment. Envoy's default retry budget (20 %, at least 3) refused most of those retries.
"""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.closed_loop import Action, closed_loop, envoy_counters, sim_state
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

CLIENTS = 64
CLUSTER = "model_fo"
# ~0.5 s per answer (16 tokens at 30 ms) and room for every client in one batch: all 64 requests are in
# flight on the engines at any moment, about half on each.
SIM_ARGS = ["--decode-ms-per-token", "30", "--prefill-base-ms", "5", "--max-batch", "64"]
COUNTERS = (
    "upstream_rq_retry",
    "upstream_rq_retry_overflow",
    "upstream_rq_per_try_idle_timeout",
    "upstream_cx_destroy_remote_with_active_rq",
)


def _stack(make_stack: StackFactory, **extra: Any) -> tuple[Any, list[int]]:
    ports = [free_port(), free_port()]
    stack = make_stack(
        registry(model("fo", "vllm", ports, **extra)),
        sim_extra_args={"fo-0": SIM_ARGS, "fo-1": SIM_ARGS},
    )
    return stack, ports


def _in_flight(port: int) -> int:
    state = sim_state(port)
    return int(state["running"]) + int(state["queue"])


def test_sigkill_of_one_of_two_replicas_under_64_clients_loses_no_request(make_stack: StackFactory) -> None:
    stack, ports = _stack(make_stack)
    envoy = stack.envoys[0]
    seen: dict[str, int] = {}

    def kill() -> None:
        seen["in_flight"] = _in_flight(ports[0])
        stack.simulators["fo-0"].kill()  # SIGKILL: every request on it sees its connection close

    before = envoy_counters(envoy.admin_url, CLUSTER, COUNTERS)
    run = closed_loop(envoy.url, "fo", clients=CLIENTS, duration_s=6.0, actions=[Action(2.5, "kill", kill)])
    after = envoy_counters(envoy.admin_url, CLUSTER, COUNTERS)
    delta = {k: after[k] - before[k] for k in COUNTERS}

    assert seen["in_flight"] >= 16, seen  # tens of requests really were in flight on the killed replica
    assert run.statuses() == {200: len(run.outcomes)}, (run.codes(), run.failures())
    # Each of them was retried on the survivor, none refused by the retry budget.
    assert delta["upstream_cx_destroy_remote_with_active_rq"] >= 16, delta
    assert delta["upstream_rq_retry"] >= delta["upstream_cx_destroy_remote_with_active_rq"], delta
    assert delta["upstream_rq_retry_overflow"] == 0, delta
    killed_at = run.marks["kill"]
    assert {o.endpoint for o in run.outcomes if o.finished < killed_at} == {"fo-0", "fo-1"}
    assert {o.endpoint for o in run.outcomes if o.started > killed_at + 0.5} == {"fo-1"}
    assert len(run.outcomes) > 2 * CLIENTS


def test_hung_replica_under_64_clients_loses_no_request(make_stack: StackFactory) -> None:
    """SIGSTOP: connections stay open and nothing answers. Each try is given up after the model's
    idle_timeout_s and retried once on the other replica; probes take the hung one out meanwhile."""
    idle_s = 4.0
    stack, ports = _stack(
        make_stack,
        limits={"idle_timeout_s": idle_s},
        health={"interval_s": 0.5, "timeout_s": 0.5, "unhealthy_threshold": 2},
    )
    envoy = stack.envoys[0]
    hung = stack.simulators["fo-0"]
    seen: dict[str, int] = {}

    def stop() -> None:
        seen["in_flight"] = _in_flight(ports[0])
        hung.signal(signal.SIGSTOP)

    before = envoy_counters(envoy.admin_url, CLUSTER, COUNTERS)
    try:
        run = closed_loop(
            envoy.url,
            "fo",
            clients=CLIENTS,
            duration_s=2.5 + idle_s + 3.0,
            actions=[Action(2.5, "stop", stop)],
            timeout_s=4 * idle_s,
        )
    finally:
        hung.signal(signal.SIGCONT)  # so that it can be stopped (SIGTERM waits on a stopped process)
    after = envoy_counters(envoy.admin_url, CLUSTER, COUNTERS)
    delta = {k: after[k] - before[k] for k in COUNTERS}

    assert seen["in_flight"] >= 16, seen
    assert run.statuses() == {200: len(run.outcomes)}, (run.codes(), run.failures())
    assert delta["upstream_rq_per_try_idle_timeout"] >= 16, delta  # the hung share timed out ...
    assert delta["upstream_rq_retry"] >= delta["upstream_rq_per_try_idle_timeout"], delta  # ... retried
    assert delta["upstream_rq_retry_overflow"] == 0, delta
    stopped_at = run.marks["stop"]
    waited = [o.finished - o.started for o in run.outcomes if o.started < stopped_at < o.finished]
    assert max(waited) >= idle_s  # the hung share waited one idle timeout, then was answered
    assert {o.endpoint for o in run.outcomes if o.started > stopped_at + idle_s} == {"fo-1"}


def test_a_retry_the_budget_refuses_names_the_failure_not_overload(make_stack: StackFactory) -> None:
    """With no retry budget at all, the requests cut by the kill fail: with `upstream_reset`, their real
    cause, not `model_overloaded` (Envoy flags a refused retry UO next to the cause's UC)."""
    stack, _ = _stack(make_stack, retry={"budget_percent": 0, "min_retry_concurrency": 0})
    envoy = stack.envoys[0]
    before = envoy_counters(envoy.admin_url, CLUSTER, COUNTERS)
    run = closed_loop(
        envoy.url,
        "fo",
        clients=CLIENTS,
        duration_s=3.5,
        actions=[Action(2.0, "kill", stack.simulators["fo-0"].kill)],
    )
    delta = {k: after - before[k] for k, after in envoy_counters(envoy.admin_url, CLUSTER, COUNTERS).items()}

    assert delta["upstream_rq_retry_overflow"] >= 8, delta  # the refused retries did happen
    failed = [o for o in run.outcomes if o.status != 200]
    codes = {(o.status, o.code) for o in failed}
    assert (503, "upstream_reset") in codes, run.failures()
    # Requests that reached the dead replica before outlier detection ejected it (a few ms) could not
    # connect: upstream_unavailable. Never the concurrency limit, which was never reached.
    assert codes <= {(503, "upstream_reset"), (503, "upstream_unavailable")}, run.failures()


def test_each_upstream_failure_cause_has_its_own_code(make_stack: StackFactory) -> None:
    """No retries: a killed replica mid-request (upstream_reset), a dead one at connect time
    (upstream_unavailable), a silent one (upstream_timeout)."""
    ports = {name: free_port() for name in ("reset", "refused", "silent")}
    # Probes far apart: Envoy keeps the dead replicas in rotation, so it meets the failures itself.
    slow_probes = {"interval_s": 600, "unhealthy_threshold": 1}
    no_retry = {"attempts": 0, "timeout_retries": 0}
    doc = registry(
        *(
            model(name, "vllm", [port], retry=no_retry, health=slow_probes, limits={"idle_timeout_s": idle})
            for (name, port), idle in zip(ports.items(), (30, 30, 1), strict=True)
        )
    )
    stack = make_stack(doc, sim_extra_args={"reset-0": SIM_ARGS})
    url = f"{stack.envoys[0].url}/v1/chat/completions"

    def ask(client: httpx.Client, name: str) -> httpx.Response:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
        return client.post(url, json=body)

    with httpx.Client(timeout=30) as client:
        stack.simulators["refused-0"].kill()
        refused = ask(client, "refused")
        httpx.post(f"http://127.0.0.1:{ports['silent']}/sim/control", json={"hang": True}, timeout=5)
        silent = ask(client, "silent")

    # 8 generations of about 2 s each, all in flight when the replica is killed 1.5 s in.
    run = closed_loop(
        stack.envoys[0].url,
        "reset",
        clients=8,
        duration_s=1.0,
        max_tokens=64,
        actions=[Action(1.5, "kill", stack.simulators["reset-0"].kill)],
    )
    reset = [o for o in run.outcomes if o.status != 200]
    assert len(reset) == len(run.outcomes) == 8, run.outcomes

    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "upstream_unavailable")
    assert (silent.status_code, silent.json()["error"]["code"]) == (504, "upstream_timeout")
    assert reset and {(o.status, o.code) for o in reset} == {(503, "upstream_reset")}, run.failures()
    for response in (refused, silent):
        assert "retry-after" not in response.headers  # that one is model_overloaded's
