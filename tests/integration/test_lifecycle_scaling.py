"""The desired replica count of a model with fixed endpoints (engines someone else runs, where Kubernetes
HPA or KEDA would act), through the real Envoy, control plane and simulated engines: with a `scaling`
section, the control plane reads its endpoints' telemetry (the simulators' DCGM GPU utilisation) and
exports `llm_gateway_model_desired_replicas` (the launched models' metric) above the endpoints it has
while they are busy, within `max_replicas`, and back after the cooldown; a model without one exports
the endpoints it lists."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, eventually, prometheus_value
from tests.support.registries import model

pytestmark = pytest.mark.integration

DESIRED = "llm_gateway_model_desired_replicas"
# Two requests at a time per engine, 8 tokens of 40 ms each: 12 clients keep both batches full.
BUSY_ENGINE = ["--max-batch", "2", "--decode-ms-per-token", "40"]


def test_a_model_with_endpoints_gets_a_desired_count_from_its_telemetry(make_stack: StackFactory) -> None:
    autoscale = {
        "target_queue_depth": None,
        "target_gpu_utilization": 0.5,
        "scale_up_after_s": 1,
        "scale_down_cooldown_s": 2,
    }
    scaled = model(
        "scaled",
        "vllm",
        [free_port(), free_port()],
        scaling={"min_replicas": 1, "max_replicas": 3, "autoscale": autoscale},
    )
    plain = model("plain", "vllm", [free_port(), free_port(), free_port()])
    doc: dict[str, Any] = {"telemetry": {"interval_s": 0.5}, "models": [scaled, plain]}
    stack = make_stack(doc, sim_extra_args={"scaled-0": BUSY_ENGINE, "scaled-1": BUSY_ENGINE})
    url, metrics = stack.envoys[0].url, f"{stack.admin_url}/metrics"
    with httpx.Client(timeout=10) as http:

        def desired(model_id: str) -> float:
            return prometheus_value(http, metrics, DESIRED, model=model_id)

        eventually(lambda: desired("plain") == 3, 20, "the listed count of a model without `scaling`")
        # Idle, two endpoints at 0 % utilisation: one would do, after the cooldown.
        eventually(lambda: desired("scaled") == 1, 30, "one replica asked for while idle")

        stop = threading.Event()
        statuses: list[int] = []
        body = {"model": "scaled", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

        def client() -> None:
            with httpx.Client(timeout=60) as session:
                while not stop.is_set():
                    statuses.append(session.post(f"{url}/v1/chat/completions", json=body).status_code)

        with ThreadPoolExecutor(12) as pool:
            clients = [pool.submit(client) for _ in range(12)]
            try:
                # Both endpoints' batches full (100 % > 50 %): one more than the two it has, then the max.
                eventually(lambda: desired("scaled") == 3, 40, "more replicas asked for under load")
            finally:
                stop.set()
            for done in clients:
                done.result(60)
        assert statuses and set(statuses) == {200}
        eventually(lambda: desired("scaled") < 3, 40, "fewer asked for after the cooldown")
        with admin_client(stack) as admin:
            overview = admin.get("/admin/lifecycle").json()["endpoint_models"]
        assert overview["scaled"]["min_replicas"] == 1 and overview["scaled"]["max_replicas"] == 3
        assert overview["scaled"]["endpoints"] == 2 and overview["plain"]["desired_replicas"] == 3
