"""The supervised local stack (`make run`'s supervisor, devstack/supervisor.py): a SIGKILLed Envoy, control
plane or simulator is restarted with backoff, under load, and the gateway answers again within a bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack
from control_plane.devstack.supervisor import Backoff
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, chat, eventually, prometheus_value, served_by
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

CLIENTS = 24  # closed-loop clients: about a dozen requests in flight per replica
RECOVERY_S = 60.0  # generous: a loaded 2-core machine restarts Envoy in seconds
BACKOFF = Backoff(initial_s=0.2, factor=2, max_s=2, stable_after_s=10)


@dataclass
class Load:
    """Outcomes of closed-loop chat requests: (start time, status or 0 for a connection error)."""

    results: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def statuses_since(self, since: float) -> list[int]:
        return [status for started, status in list(self.results) if started >= since]


@contextmanager
def load(url: str) -> Iterator[Load]:
    state = Load()

    def client_loop() -> None:
        with httpx.Client(timeout=30) as client:
            while not state.stop.is_set():
                started = time.monotonic()
                try:
                    status = chat(client, url, "qwen2").status_code
                except httpx.HTTPError:
                    status = 0
                    time.sleep(0.05)  # the gateway is down: do not spin
                state.results.append((started, status))

    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(CLIENTS):
            pool.submit(client_loop)
        try:
            yield state
        finally:
            state.stop.set()


@pytest.fixture
def stack(make_stack: StackFactory) -> Iterator[tuple[LocalStack, list[str]]]:
    stack = make_stack(registry(model("qwen2", "tgi", [free_port(), free_port()])))
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        stack.supervisor_log(line)  # and the stack's logs/supervisor.log, as under `make run`

    stack.supervise(backoff=BACKOFF, report=report)
    yield stack, lines


def answers(url: str) -> bool:
    try:
        with httpx.Client(timeout=5) as client:
            return chat(client, url, "qwen2").status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_envoy_is_restarted_and_the_gateway_answers_again(
    stack: tuple[LocalStack, list[str]],
) -> None:
    stack_, lines = stack
    envoy = stack_.envoys[0]
    old_pid = envoy.process.pid
    with load(envoy.url) as traffic:
        eventually(lambda: len(traffic.statuses_since(0)) > 50, what="load to run")
        envoy.process.kill()  # SIGKILL
        killed = time.monotonic()
        eventually(lambda: answers(envoy.url), timeout_s=RECOVERY_S, what="the gateway to answer again")
        back = time.monotonic()
        time.sleep(2)
    assert envoy.process.alive() and envoy.process.pid != old_pid
    assert back - killed < RECOVERY_S
    # Once back, every request of the load succeeds (same ports, same bootstrap, config from the control
    # plane over a new authenticated stream).
    after = traffic.statuses_since(back + 0.5)
    assert after and set(after) == {200}, sorted(set(after))
    assert stack_.supervisor is not None and stack_.supervisor.restarts == {"envoy-gateway-0": 1}
    assert any(line.startswith("[supervisor] envoy-gateway-0 died (exit status -9") for line in lines)
    assert "[supervisor] envoy-gateway-0 restarted (1 restarts so far)" in lines
    assert "envoy-gateway-0 restarted" in (stack_.settings.work_dir / "logs" / "supervisor.log").read_text()


def test_a_killed_control_plane_is_restarted_and_envoy_resyncs(stack: tuple[LocalStack, list[str]]) -> None:
    stack_, lines = stack
    envoy = stack_.envoys[0]
    assert stack_.control_plane is not None
    old = stack_.control_plane
    with load(envoy.url) as traffic:
        eventually(lambda: len(traffic.statuses_since(0)) > 50, what="load to run")
        started = time.monotonic()
        old.kill()
        eventually(
            lambda: stack_.control_plane is not old and stack_.control_plane is not None
            and stack_.control_plane.alive(),
            timeout_s=RECOVERY_S,
            what="a new control plane",
        )
        with admin_client(stack_) as admin:

            def envoy_connected() -> bool:
                try:
                    metrics = f"{stack_.admin_url}/metrics"
                    return prometheus_value(admin, metrics, "llm_gateway_xds_connected_envoys") == 1
                except httpx.HTTPError:
                    return False

            eventually(envoy_connected, timeout_s=RECOVERY_S, what="Envoy to reconnect")
            # The restarted control plane drives Envoy again: a change reaches the gateway.
            disabled = time.monotonic()
            admin.post("/admin/models/qwen2/disable").raise_for_status()
            with httpx.Client(timeout=10) as client:
                eventually(
                    lambda: chat(client, envoy.url, "qwen2").status_code == 503,
                    timeout_s=10,
                    what="the disable to reach Envoy",
                )
            admin.post("/admin/models/qwen2/enable").raise_for_status()
            eventually(lambda: answers(envoy.url), timeout_s=10, what="the model back")
    # While the control plane was away Envoy served on its last config: nothing failed before the disable.
    during = [s for t, s in list(traffic.results) if started <= t < disabled]
    assert during and set(during) == {200}, sorted(set(during))
    assert any("[supervisor] control-plane restarted" in line for line in lines)


def test_a_killed_simulator_is_restarted_and_serves_again(stack: tuple[LocalStack, list[str]]) -> None:
    stack_, lines = stack
    envoy = stack_.envoys[0]
    sim = stack_.simulators["qwen2-0"]
    old_pid = sim.pid
    with load(envoy.url) as traffic, admin_client(stack_) as admin:
        eventually(lambda: len(traffic.statuses_since(0)) > 50, what="load to run")
        sim.kill()
        eventually(
            lambda: sim.alive() and sim.pid != old_pid, timeout_s=RECOVERY_S, what="the simulator back"
        )
        eventually(
            lambda: admin.get("/admin/endpoints/qwen2-0").json()["health"] == "healthy",
            timeout_s=RECOVERY_S,
            what="the endpoint healthy again",
        )
        with httpx.Client(timeout=10) as client:

            def served_by_it() -> bool:
                response = chat(client, envoy.url, "qwen2")
                return response.status_code == 200 and served_by(response) == "qwen2-0"

            eventually(served_by_it, timeout_s=RECOVERY_S, what="requests served by the restarted simulator")
    assert "[supervisor] sim-qwen2-0 restarted (1 restarts so far)" in lines
