"""Health probes steer Envoy: a crashed, hung or wrong-model endpoint leaves rotation within the probe
budget and comes back when it recovers."""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, chat, eventually, served_by
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

FAST_PROBES = {
    "interval_s": 0.2,
    "timeout_s": 0.3,
    "unhealthy_threshold": 2,
    "healthy_threshold": 1,
    "jitter": 0,
}
# Two probes at 0.2 s plus a 0.3 s timeout each, plus the push: well under 2 s.
PROBE_BUDGET_S = 2.0


def fast_registry(*models: dict[str, Any]) -> dict[str, Any]:
    return {**registry(*models), "health": FAST_PROBES}


def endpoint(admin: httpx.Client, endpoint_id: str) -> dict[str, Any]:
    response = admin.get(f"/admin/endpoints/{endpoint_id}")
    response.raise_for_status()
    return dict(response.json())


def served(client: httpx.Client, url: str, model_id: str, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        response = chat(client, url, model_id)
        seen[served_by(response) if response.status_code == 200 else str(response.status_code)] += 1
    return seen


def test_crashed_endpoint_leaves_rotation_and_comes_back(make_stack: StackFactory) -> None:
    stack = make_stack(fast_registry(model("qwen2", "tgi", [free_port(), free_port()])))
    url = stack.envoys[0].url
    with httpx.Client(timeout=10) as client, admin_client(stack) as admin:
        eventually(lambda: endpoint(admin, "qwen2-0")["health"] == "healthy", what="first probe")
        stack.simulators["qwen2-0"].kill()
        killed = time.monotonic()
        eventually(
            lambda: endpoint(admin, "qwen2-0")["health"] == "unhealthy",
            timeout_s=PROBE_BUDGET_S,
            what="the crashed endpoint to be marked unhealthy",
        )
        assert time.monotonic() - killed < PROBE_BUDGET_S
        assert "unreachable" in endpoint(admin, "qwen2-0")["reason"]
        # Out of rotation: Envoy no longer even tries it (no connect failures, no retries needed).
        assert served(client, url, "qwen2", 20) == Counter({"qwen2-1": 20})
        metrics = admin.get("/metrics").text
        assert 'llm_gateway_endpoint_healthy{endpoint="qwen2-0",model="qwen2"} 0.0' in metrics

        model_doc = stack.registry().models[0]
        stack.start_simulator(model_doc, 0)
        eventually(
            lambda: endpoint(admin, "qwen2-0")["health"] == "healthy",
            timeout_s=PROBE_BUDGET_S,
            what="the endpoint to come back",
        )
        eventually(lambda: "qwen2-0" in served(client, url, "qwen2", 10), what="traffic to return")


def test_hung_endpoint_is_handled_by_timeouts_and_ejection(make_stack: StackFactory) -> None:
    stack = make_stack(
        fast_registry(model("qwen2", "tgi", [free_port(), free_port()], limits={"idle_timeout_s": 1}))
    )
    url = stack.envoys[0].url
    hung = stack.simulators["qwen2-0"]
    with httpx.Client(timeout=15) as client, admin_client(stack) as admin:
        eventually(lambda: endpoint(admin, "qwen2-0")["health"] == "healthy", what="first probe")
        # SIGSTOP: the kernel still accepts connections for the process, which never answers.
        hung.signal(signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            # A request that lands on the hung replica is given up after the idle timeout and retried on
            # the other one: slow, but answered. Envoy also ejects the replica after two such timeouts.
            answers = [chat(client, url, "qwen2") for _ in range(4)]
            assert [a.status_code for a in answers] == [200] * 4
            assert {served_by(a) for a in answers} == {"qwen2-1"}
            eventually(
                lambda: endpoint(admin, "qwen2-0")["health"] == "unhealthy",
                timeout_s=PROBE_BUDGET_S,
                what="the hung endpoint to be marked unhealthy",
            )
            assert time.monotonic() - stopped < 4 * 1.5 + PROBE_BUDGET_S
            assert "no answer within" in endpoint(admin, "qwen2-0")["reason"]
            # Out of rotation: every request is fast now.
            started = time.monotonic()
            assert served(client, url, "qwen2", 10) == Counter({"qwen2-1": 10})
            assert time.monotonic() - started < 5
        finally:
            hung.signal(signal.SIGCONT)
        eventually(
            lambda: endpoint(admin, "qwen2-0")["health"] == "healthy",
            timeout_s=PROBE_BUDGET_S,
            what="the endpoint to recover",
        )


def test_endpoint_serving_another_model_is_refused(make_stack: StackFactory) -> None:
    stack = make_stack(
        fast_registry(model("llama3", "vllm", [free_port(), free_port()])),
        sim_extra_args={"llama3-1": ["--model-id", "mistral-7b"]},  # a misconfigured replica
    )
    url = stack.envoys[0].url
    with httpx.Client(timeout=10) as client, admin_client(stack) as admin:
        eventually(
            lambda: endpoint(admin, "llama3-1")["health"] == "unhealthy",
            timeout_s=PROBE_BUDGET_S,
            what="the wrong-model endpoint to be refused",
        )
        reason = endpoint(admin, "llama3-1")["reason"]
        assert "serves mistral-7b" in reason and "expected llama3" in reason
        assert endpoint(admin, "llama3-0")["health"] == "healthy"
        assert served(client, url, "llama3", 20) == Counter({"llama3-0": 20})


def test_no_panic_routing_when_most_endpoints_are_down(make_stack: StackFactory) -> None:
    from tests.support.gateway import envoy_stat

    stack = make_stack(fast_registry(model("qwen2", "tgi", [free_port(), free_port(), free_port()])))
    url, admin_url = stack.envoys[0].url, stack.envoys[0].admin_url
    with httpx.Client(timeout=10) as client, admin_client(stack) as admin:
        for endpoint_id in ("qwen2-0", "qwen2-1"):
            stack.simulators[endpoint_id].kill()
        eventually(
            lambda: admin.get("/admin/models/qwen2").json()["healthy_endpoints"] == 1,
            timeout_s=PROBE_BUDGET_S + 1,
            what="two endpoints marked unhealthy",
        )
        # One healthy of three is under Envoy's default 50% panic threshold; with panic routing Envoy would
        # spread requests over the dead hosts too. It is turned off, so every request goes to the live one.
        assert served(client, url, "qwen2", 20) == Counter({"qwen2-2": 20})
        assert envoy_stat(client, admin_url, "cluster.model_qwen2.lb_healthy_panic") == 0
        assert envoy_stat(client, admin_url, "cluster.model_qwen2.upstream_cx_connect_fail") == 0
