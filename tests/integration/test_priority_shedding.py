"""Priority shedding through a real Envoy and control plane: a model whose engines' queues pass the
thresholds (read from their /metrics by the control plane) sheds low-priority requests first, default
ones too when severe, high ones never; the class comes from the API key when keys are on, and a client
header may then lower it but never raise it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory, write_config
from tests.support.closed_loop import sim_state
from tests.support.gateway import admin_client, eventually, prometheus_value
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

HEADER = "x-gateway-priority"
# One batch slot of two per replica: a few long requests keep a queue the telemetry sees.
SIM_ARGS = ["--max-batch", "2", "--decode-ms-per-token", "10"]
BACKGROUND = 10  # long high-priority requests always in flight: queue ≈ 8 on the single replica


def _doc(
    port: int, severe_queue: float, priority_header: bool = True, auth: dict[str, Any] | None = None
) -> Any:
    doc = registry(model("busy", "vllm", [port]))
    doc["telemetry"] = {"interval_s": 0.3}
    doc["overload"] = {
        "priority_header": priority_header,
        "saturated": {"queue_per_replica": 3},
        "severe": {"queue_per_replica": severe_queue},
        "hold_s": 1,
    }
    if auth:
        doc["auth"] = auth
    return doc


@contextmanager
def background(url: str, headers: dict[str, str]) -> Iterator[Counter[int]]:
    """BACKGROUND closed-loop clients sending long requests until the block ends."""
    stop = threading.Event()
    statuses: Counter[int] = Counter()

    async def client_loop(client: httpx.AsyncClient) -> None:
        body = {"model": "busy", "messages": [{"role": "user", "content": "long"}], "max_tokens": 40}
        while not stop.is_set():
            try:
                response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                statuses[response.status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1

    async def main() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(client_loop(client) for _ in range(BACKGROUND)))

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(timeout=60)


async def _burst(url: str, per_class: list[tuple[str, dict[str, str]]], count: int) -> dict[str, list[Any]]:
    """`count` requests of every class at once; their (status, code, retry-after) by class."""
    body = {"model": "busy", "messages": [{"role": "user", "content": "probe"}], "max_tokens": 2}
    limits = httpx.Limits(max_connections=count * len(per_class))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(headers: dict[str, str]) -> tuple[int, str, str | None]:
            response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
            return response.status_code, code, response.headers.get("retry-after")

        results = await asyncio.gather(*(one(h) for _, h in per_class for _ in range(count)))
    out: dict[str, list[Any]] = {name: [] for name, _ in per_class}
    for index, result in enumerate(results):
        out[per_class[index // count][0]].append(result)
    return out


def burst(url: str, per_class: list[tuple[str, dict[str, str]]], count: int = 10) -> dict[str, list[Any]]:
    return asyncio.run(_burst(url, per_class, count))


def _level(stack: Any) -> float:
    with httpx.Client(timeout=5) as client:
        return prometheus_value(
            client, f"{stack.admin_url}/metrics", "llm_gateway_model_saturation", model="busy"
        )


def _shed(result: tuple[int, str, str | None]) -> bool:
    return result[0] == 503 and result[1] == "model_overloaded" and result[2] == "2"


def test_low_is_shed_first_then_default_and_high_never(make_stack: StackFactory) -> None:
    port = free_port()
    stack = make_stack(_doc(port, severe_queue=1000), sim_extra_args={"busy-0": SIM_ARGS})
    url = stack.envoys[0].url
    classes = [(c, {HEADER: c}) for c in ("low", "default", "high")]
    quiet = burst(url, classes, count=3)
    assert all(r[0] == 200 for results in quiet.values() for r in results), quiet  # nothing shed idle

    with background(url, {HEADER: "high"}) as statuses:
        eventually(lambda: _level(stack) == 1, timeout_s=20, what="saturated")
        eventually(lambda: _shed(burst(url, classes[:1], count=1)["low"][0]), timeout_s=10, what="low shed")
        saturated = burst(url, classes)
        assert all(map(_shed, saturated["low"])), saturated["low"]
        assert [r[0] for r in saturated["default"] + saturated["high"]] == [200] * 20, saturated

        # Severe: the same load over a lower threshold (a registry reload).
        write_config(stack, _doc(port, severe_queue=4))
        eventually(lambda: _level(stack) == 2, timeout_s=20, what="severe")
        eventually(
            lambda: _shed(burst(url, classes[1:2], 1)["default"][0]), timeout_s=10, what="default shed"
        )
        severe = burst(url, classes)
        assert all(map(_shed, severe["low"] + severe["default"])), severe
        assert [r[0] for r in severe["high"]] == [200] * 10, severe["high"]

        # (From here the background's `high` header stops counting too: until the level falls from 2 to
        # 1 its requests, now `default`, may be shed. What it got so far was all served.)
        while_allowed = Counter(statuses)
        # Without the registry's leave, the header is ignored: every request is `default`.
        write_config(stack, _doc(port, severe_queue=1000, priority_header=False))
        eventually(lambda: _level(stack) == 1, timeout_s=20, what="back to saturated")
        eventually(
            lambda: burst(url, classes[:1], 1)["low"][0][0] == 200, timeout_s=10, what="header ignored"
        )
        ignored = burst(url, [("low", {HEADER: "low"}), ("none", {})])
        assert [r[0] for r in ignored["low"] + ignored["none"]] == [200] * 20, ignored
    assert while_allowed[200] > 0 and set(while_allowed) == {200}, while_allowed  # high never shed

    with httpx.Client(timeout=5) as client:
        metrics = f"{stack.admin_url}/metrics"

        def counted(priority: str) -> float:
            return prometheus_value(
                client, metrics, "llm_gateway_shed_requests_total", model="busy", priority=priority
            )

        eventually(lambda: counted("low") >= 20 and counted("default") >= 10, timeout_s=10, what="counted")
        assert counted("high") == 0


KEYS = {name: f"sk-{name}-0123456789abcdef0123456789" for name in ("low", "default", "high")}


def test_the_key_sets_the_class_and_a_header_cannot_raise_it(make_stack: StackFactory) -> None:
    port = free_port()
    auth = {
        "mode": "api_key",
        "keys": [
            {"name": f"k-{name}", "sha256": hashlib.sha256(key.encode()).hexdigest(), "priority": name}
            for name, key in KEYS.items()
        ],
    }
    stack = make_stack(_doc(port, severe_queue=1000, auth=auth), sim_extra_args={"busy-0": SIM_ARGS})
    url = stack.envoys[0].url

    def key(name: str, **headers: str) -> dict[str, str]:
        return {"authorization": f"Bearer {KEYS[name]}", **headers}

    with background(url, key("high")) as statuses:
        eventually(lambda: _level(stack) == 1, timeout_s=20, what="saturated")
        eventually(lambda: _shed(burst(url, [("low", key("low"))], 1)["low"][0]), timeout_s=10, what="shed")
        results = burst(
            url,
            [
                ("low", key("low")),
                ("low-asks-high", key("low", **{HEADER: "high"})),
                ("default-asks-low", key("default", **{HEADER: "low"})),
                ("default", key("default")),
                ("default-asks-high", key("default", **{HEADER: "high"})),
                ("high", key("high")),
            ],
            count=5,
        )
    for shed in ("low", "low-asks-high", "default-asks-low"):
        assert all(map(_shed, results[shed])), (shed, results[shed])
    for served in ("default", "default-asks-high", "high"):
        assert [r[0] for r in results[served]] == [200] * 5, (served, results[served])
    assert set(statuses) == {200}, statuses

    # The shed requests of the low key are counted by its class, not by the header it sent.
    with admin_client(stack) as admin:
        assert admin.get("/admin/keys").status_code == 200
    with httpx.Client(timeout=5) as client:
        eventually(
            lambda: (
                prometheus_value(
                    client,
                    f"{stack.admin_url}/metrics",
                    "llm_gateway_shed_requests_total",
                    model="busy",
                    priority="low",
                )
                >= 15
            ),
            timeout_s=10,
            what="counted as low",
        )


def test_a_reserve_keeps_engine_slots_for_high_keys(make_stack: StackFactory) -> None:
    """4 requests in flight at most, 2 kept for high priority: default keys hold 2 (the rest waits in
    Envoy, not in the engine), a default key asking for `high` in a header stays among them, and a high
    key's requests pass them through the reserve."""
    port = free_port()
    auth = {
        "mode": "api_key",
        "keys": [
            {"name": f"k-{name}", "sha256": hashlib.sha256(key.encode()).hexdigest(), "priority": name}
            for name, key in KEYS.items()
        ],
    }
    doc = _doc(port, severe_queue=1000, auth=auth)
    doc["overload"]["saturated"] = {"queue_per_replica": 1000}  # the reserve alone here
    doc["models"][0]["limits"] = {"max_concurrent_requests": 4, "max_pending_requests": 64}
    doc["models"][0]["overload"] = {"reserve_for_high": 2}
    stack = make_stack(doc, sim_extra_args={"busy-0": ["--max-batch", "8", "--decode-ms-per-token", "20"]})
    url = stack.envoys[0].url

    def post(key: str, tokens: int, **headers: str) -> httpx.Response:
        body = {"model": "busy", "messages": [{"role": "user", "content": "x"}], "max_tokens": tokens}
        auth_header = {"authorization": f"Bearer {KEYS[key]}", **headers}
        return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth_header, timeout=120)

    def engine_running() -> int:
        return int(sim_state(port)["running"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        background = [pool.submit(post, "default", 60) for _ in range(10)]  # 2 at a time: ~6 s in all
        eventually(lambda: engine_running() == 2, timeout_s=10, what="default keys at their cap")
        asking = [pool.submit(post, "default", 2, **{HEADER: "high"}) for _ in range(3)]
        seen = []
        for _ in range(10):  # the header does not open the reserve: still 2 in the engine
            seen.append(engine_running())
            time.sleep(0.05)
        assert max(seen) <= 2, seen
        high = [pool.submit(post, "high", 2) for _ in range(4)]
        high_statuses = [f.result().status_code for f in high]
        still_running = sum(not f.done() for f in background)
        assert high_statuses == [200] * 4
        assert still_running >= 4, still_running  # the high key's requests overtook the default ones
        assert [f.result().status_code for f in background + asking] == [200] * 13
