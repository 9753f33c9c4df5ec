"""Telemetry moves EDS weights: a replica made slow gets a lower weight and a smaller share of requests."""

from __future__ import annotations

import threading
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

WORKERS = 6
PHASE_S = 3.0


def run_load(url: str, seconds: float) -> Counter[str]:
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(timeout=20) as client:
            for _ in range(1000):
                if time.monotonic() > deadline:
                    return
                response = chat(client, url, "qwen2", max_tokens=8)
                with lock:
                    seen[
                        served_by(response) if response.status_code == 200 else str(response.status_code)
                    ] += 1

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 30)
    return seen


def weights(admin: httpx.Client) -> dict[str, Any]:
    return {e["id"]: e["weight"] for e in admin.get("/admin/models/qwen2").json()["endpoints"]}


def test_a_slow_endpoint_loses_weight_and_share(make_stack: StackFactory) -> None:
    ports = [free_port(), free_port()]
    doc = {
        **registry(model("qwen2", "tgi", ports)),
        "telemetry": {
            "interval_s": 0.3,
            "min_push_interval_s": 0.5,
            "hysteresis": 0.1,
            "policy": "telemetry",
        },
    }
    args = ["--decode-ms-per-token", "15", "--max-batch", "2"]
    stack = make_stack(doc, sim_extra_args={"qwen2-0": args, "qwen2-1": args})
    url = stack.envoys[0].url
    with admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        before = run_load(url, PHASE_S)
        assert set(before) == {"qwen2-0", "qwen2-1"}, before
        even = weights(admin)

        client.post(f"http://127.0.0.1:{ports[0]}/sim/control", json={"slowdown": 4.0}).raise_for_status()
        run_load(url, PHASE_S)  # the slow replica's queue and latency show in its /metrics
        eventually(
            lambda: weights(admin)["qwen2-0"] < weights(admin)["qwen2-1"],
            timeout_s=5,
            what="the slow endpoint's weight to fall",
        )
        after = run_load(url, PHASE_S)
        moved = weights(admin)

    share_before = before["qwen2-0"] / sum(before.values())
    share_after = after["qwen2-0"] / sum(after.values())
    assert moved["qwen2-0"] < moved["qwen2-1"], (even, moved)
    assert share_after < share_before * 0.75, (before, after, moved)
    assert share_after < 0.4, (after, moved)
