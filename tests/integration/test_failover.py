"""Killing one of two endpoints under a steady request loop fails no request: Envoy retries elsewhere."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.gateway import chat, served_by
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

WORKERS = 4
DURATION_S = 4.0
KILL_AT_S = 1.5


def test_killing_an_endpoint_under_load_fails_no_request(make_stack: StackFactory) -> None:
    stack = make_stack(registry(model("qwen2", "tgi", [free_port(), free_port()])))
    url = stack.envoys[0].url
    results: list[tuple[float, int, str]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + DURATION_S

    def worker() -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(10_000):  # bounded in count as well as in time
                if time.monotonic() > deadline:
                    return
                response = chat(client, url, "qwen2")
                who = served_by(response) if response.status_code == 200 else response.text[:200]
                with lock:
                    results.append((time.monotonic(), response.status_code, who))

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    time.sleep(KILL_AT_S)
    killed_at = time.monotonic()
    stack.simulators["qwen2-0"].kill()  # SIGKILL: in-flight requests see a reset
    for thread in threads:
        thread.join(timeout=30)

    statuses = Counter(status for _, status, _ in results)
    assert statuses[200] == len(results), [r for r in results if r[1] != 200][:5]
    before = Counter(who for t, _, who in results if t < killed_at)
    after = Counter(who for t, _, who in results if t > killed_at + 0.5)
    assert set(before) == {"qwen2-0", "qwen2-1"}  # both served before the kill
    assert set(after) == {"qwen2-1"}  # only the survivor after it
    assert len(results) > 50
