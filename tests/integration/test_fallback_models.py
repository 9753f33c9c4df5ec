"""Fallback models through a real Envoy and control plane: a model whose replicas die sends its requests
to its fallback (body `model` rewritten for the fallback's servers, which refuse names they do not serve;
`x-gateway-model` / `x-gateway-fallback-from` on the answer, streams included) and comes back when it
recovers; a saturated model falls back too. Fallbacks are counted off the access-log stream."""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.closed_loop import Action, closed_loop
from tests.support.gateway import eventually, prometheus_value
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
FAST_HEALTH = {"interval_s": 0.3, "timeout_s": 0.5, "unhealthy_threshold": 2, "jitter": 0}


def _chat(url: str, name: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": name, **CHAT, **extra}, timeout=30)


def _fleet(make_stack: StackFactory, **primary_extra: Any) -> Any:
    doc = registry(
        # Both vLLM-style: a vLLM server refuses a `model` it does not serve (404), so an answer from the
        # backup proves the rename.
        model(
            "primary",
            "vllm",
            [free_port(), free_port()],
            aliases=["prim"],
            fallbacks=["backup"],
            **primary_extra,
        ),
        model("backup", "vllm", [free_port()]),
    )
    doc["health"] = FAST_HEALTH
    doc["telemetry"] = {"interval_s": 0.3}
    return make_stack(doc)


def _switched(stack: Any) -> bool:
    with httpx.Client(timeout=5) as client:
        metrics = f"{stack.admin_url}/metrics"
        labels = {"model": "primary", "fallback": "backup"}
        return prometheus_value(client, metrics, "llm_gateway_model_fallback_active", **labels) == 1


def _served_by_backup(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.headers.get("x-gateway-model") == "backup"


def test_a_dead_model_falls_back_and_returns_when_it_recovers(make_stack: StackFactory) -> None:
    stack = _fleet(make_stack)
    url = stack.envoys[0].url
    first = _chat(url, "primary")
    assert first.status_code == 200 and first.json()["model"] == "primary", first.text
    assert "x-gateway-fallback-from" not in first.headers

    primary = [p for name, p in stack.simulators.items() if name.startswith("primary-")]
    switched: dict[str, float] = {}

    def kill_primary() -> None:
        for process in primary:
            process.kill()

    def watch_switch() -> None:  # the first answer the backup gives: the switch is in Envoy
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _served_by_backup(_chat(url, "primary")):
            time.sleep(0.05)
        switched["at"] = time.monotonic()

    # 24 clients in flight on the primary's two replicas when both die.
    run = closed_loop(
        url,
        "primary",
        clients=24,
        duration_s=5.0,
        actions=[Action(1.0, "kill", kill_primary), Action(1.0, "watch", watch_switch)],
        timeout_s=30,
    )
    assert "at" in switched, "no request was served by the fallback within 20 s"
    before_kill = [o for o in run.outcomes if o.finished < run.marks["kill"]]
    after_switch = [o for o in run.outcomes if o.started > switched["at"] + 0.2]
    assert before_kill and {o.status for o in before_kill} == {200}, run.failures()
    assert len(after_switch) > 24, len(after_switch)
    assert {o.status for o in after_switch} == {200}, [o for o in after_switch if o.status != 200][:3]
    assert {o.endpoint for o in after_switch} == {"backup-0"}

    # Plain and streamed answers, by id and by alias: the fallback's name in the body and the headers.
    for name in ("primary", "prim"):
        answer = _chat(url, name)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "backup"
        assert answer.headers["x-gateway-model"] == "backup"
        assert answer.headers["x-gateway-fallback-from"] == "primary"
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={"model": "primary", "stream": True, **CHAT}, timeout=30
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["x-gateway-fallback-from"] == "primary"
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2, events
    assert {json.loads(e)["model"] for e in events[:-1]} == {"backup"}

    # Counted per model and fallback (the access-log stream flushes every second).
    metrics = f"{stack.admin_url}/metrics"
    eventually(
        lambda: (
            prometheus_value(
                httpx.Client(),
                metrics,
                "llm_gateway_fallback_requests_total",
                model="primary",
                fallback="backup",
            )
            >= len(after_switch)
        ),
        timeout_s=10,
        what="fallbacks counted",
    )
    with httpx.Client() as client:
        assert (
            prometheus_value(
                client, metrics, "llm_gateway_model_fallback_active", model="primary", fallback="backup"
            )
            == 1
        )

    # The primary recovers: its requests go back to it.
    registry_model = stack.registry().model("primary")
    for index in range(2):
        stack.start_simulator(registry_model, index)
    eventually(
        lambda: (r := _chat(url, "primary")).status_code == 200 and r.json()["model"] == "primary",
        timeout_s=20,
        what="back on the primary",
    )
    back = _chat(url, "primary")
    assert back.json()["model"] == "primary" and "x-gateway-fallback-from" not in back.headers


def test_a_saturated_model_falls_back_while_its_fallback_is_not(make_stack: StackFactory) -> None:
    """The primary's single batch slot and a queue past its threshold (from telemetry): its requests go to
    the backup until the queue clears, then back."""
    stack = _fleet(
        make_stack, overload={"saturated": {"queue_per_replica": 2}, "severe": {"queue_per_replica": 1000}}
    )
    url = stack.envoys[0].url
    for port in (e.port for e in stack.registry().model("primary").endpoints):
        control = {"max_batch": 1, "decode_ms_per_token": 60}
        httpx.post(f"http://127.0.0.1:{port}/sim/control", json=control, timeout=5).raise_for_status()

    # 12 long requests fill the two replicas' queues (they were admitted before the switch).
    with httpx.Client(timeout=60) as client, concurrent.futures.ThreadPoolExecutor(12) as pool:
        body = {"model": "primary", "messages": [{"role": "user", "content": "x"}], "max_tokens": 40}
        futures = [pool.submit(client.post, f"{url}/v1/chat/completions", json=body) for _ in range(12)]
        # (A request sent before the switch would wait in the primary's queue: watch the gauge first.)
        eventually(lambda: _switched(stack), timeout_s=20, what="switch decided")
        eventually(lambda: _served_by_backup(_chat(url, "primary")), timeout_s=20, what="fallback")
        answer = _chat(url, "primary")
        assert answer.json()["model"] == "backup" and answer.headers["x-gateway-fallback-from"] == "primary"
        statuses = [f.result().status_code for f in futures]
    assert statuses.count(200) == 12, statuses
    # The queue cleared: after the hold time the primary takes its requests again.
    eventually(
        lambda: (r := _chat(url, "primary")).status_code == 200 and r.json()["model"] == "primary",
        timeout_s=30,
        what="back on the primary",
    )
