"""Fallback models with a failing fleet, through a real Envoy and control plane: a model and its fallback
both down answer the model's usual 503 (no loop); a chain A → B → C with A and B down sends B's requests
to C and A's get A's 503 (only a model's own list counts); a saturated fallback is passed over for the
next; tens of streams in flight through a fallback survive the switch back and the fallback's removal
from the registry."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory, write_config
from tests.integration.test_hostile_balancing import assert_no_lua_errors
from tests.support.gateway import eventually
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
FAST_HEALTH = {"interval_s": 0.3, "timeout_s": 0.5, "unhealthy_threshold": 2, "jitter": 0}


def _chat(url: str, name: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": name, **CHAT}, timeout=30)


def _kill(stack: Any, *model_ids: str) -> None:
    for name, process in stack.simulators.items():
        if name.rsplit("-", 1)[0] in model_ids:
            process.kill()


def _served_by(response: httpx.Response) -> str | None:
    return response.headers.get("x-gateway-model") if response.status_code == 200 else None


def test_dead_chains_and_saturated_fallbacks(make_stack: StackFactory) -> None:
    doc = registry(
        model("a", "vllm", [free_port()], fallbacks=["b"]),
        model("b", "vllm", [free_port()], fallbacks=["c"]),
        model("c", "vllm", [free_port()]),
        model("d", "vllm", [free_port()], fallbacks=["e"]),
        model("e", "vllm", [free_port()]),
        model("f", "vllm", [free_port()], fallbacks=["g", "h"]),
        # Always saturated: 0 requests waiting is at its threshold.
        model("g", "vllm", [free_port()], overload={"saturated": {"queue_per_replica": 0}}),
        model("h", "vllm", [free_port()]),
    )
    doc["health"] = FAST_HEALTH
    doc["telemetry"] = {"interval_s": 0.3}
    stack = make_stack(doc)
    url = stack.envoys[0].url
    for name in "abcdefh":
        first = _chat(url, name)
        assert first.status_code == 200 and first.json()["model"] == name, (name, first.text)

    _kill(stack, "a", "b", "d", "e", "f")
    # B falls back to C; F passes over the saturated G for H.
    eventually(lambda: _served_by(_chat(url, "b")) == "c", timeout_s=20, what="b on c")
    eventually(lambda: _served_by(_chat(url, "f")) == "h", timeout_s=20, what="f on h")
    # D and its fallback E are both down: D answers as E does (a dead model's 503), quickly and without
    # a fallback header; A's only fallback B is down: the same (B's own fallback is not followed).
    dead = _chat(url, "e")
    assert dead.status_code == 503, dead.text
    code = dead.json()["error"]["code"]
    for name in ("d", "a"):
        for _ in range(5):
            answer = _chat(url, name)
            assert answer.status_code == 503, (name, answer.text)
            assert answer.json()["error"]["code"] == code, (name, answer.text)
            assert "x-gateway-fallback-from" not in answer.headers, (name, dict(answer.headers))
    for _ in range(10):
        answer = _chat(url, "f")
        assert _served_by(answer) == "h" and answer.json()["model"] == "h", answer.text
        assert answer.headers["x-gateway-fallback-from"] == "f"
    assert_no_lua_errors(stack)


class _Streams:
    """`count` streams of one model kept in flight from a thread, each one's outcome recorded."""

    def __init__(self, url: str, name: str, count: int) -> None:
        self.url, self.name, self.count = url, name, count
        self.outcomes: list[tuple[int, str | None, int, bool]] = []  # status, served by, events, done
        self.started = threading.Event()
        self._running = 0
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),))

    async def _one(self, client: httpx.AsyncClient) -> None:
        body = {"model": self.name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 60}
        events, done, status, served = 0, False, 0, None
        try:
            async with client.stream(
                "POST", f"{self.url}/v1/chat/completions", json={**body, "stream": True}
            ) as r:
                status, served = r.status_code, r.headers.get("x-gateway-model")
                self._running += 1
                if self._running == self.count:
                    self.started.set()
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        json.loads(line[6:])
                        events += 1
        except httpx.HTTPError:
            pass
        self.outcomes.append((status, served, events, done))

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=self.count)) as client:
            await asyncio.gather(*(self._one(client) for _ in range(self.count)))

    def __enter__(self) -> _Streams:
        self._thread.start()
        assert self.started.wait(30), f"only {self._running} of {self.count} streams started"
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=90)


def test_streams_through_a_fallback_survive_the_switch_back_and_its_removal(make_stack: StackFactory) -> None:
    ports = {"primary": free_port(), "backup": free_port()}

    def doc(with_backup: bool) -> dict[str, Any]:
        models = [model("primary", "vllm", [ports["primary"]], fallbacks=["backup"] if with_backup else [])]
        if with_backup:
            models.append(model("backup", "vllm", [ports["backup"]]))
        out = registry(*models)
        out["health"] = FAST_HEALTH
        out["telemetry"] = {"interval_s": 0.3}
        return out

    # The backup streams a token every 100 ms: a 60-token stream lasts 6 s.
    stack = make_stack(doc(True), sim_extra_args={"backup-0": ["--decode-ms-per-token", "100"]})
    url = stack.envoys[0].url
    _kill(stack, "primary")
    eventually(lambda: _served_by(_chat(url, "primary")) == "backup", timeout_s=20, what="on the backup")

    # 24 streams in flight on the backup when the primary comes back and its routes switch back.
    with _Streams(url, "primary", 24) as streams:
        stack.start_simulator(stack.registry().model("primary"), 0)
        eventually(lambda: _served_by(_chat(url, "primary")) is None, timeout_s=20, what="switched back")
        assert len(streams.outcomes) < 24, "every stream ended before the switch: the test proves nothing"
    assert len(streams.outcomes) == 24
    assert all(o[:2] == (200, "backup") and o[2] >= 60 and o[3] for o in streams.outcomes), streams.outcomes

    # Down again, on the backup again; then the backup leaves the registry while 24 streams run on it.
    _kill(stack, "primary")
    eventually(
        lambda: _served_by(_chat(url, "primary")) == "backup", timeout_s=20, what="on the backup again"
    )
    with _Streams(url, "primary", 24) as streams:
        write_config(stack, doc(False))
        eventually(lambda: _chat(url, "backup").status_code == 404, timeout_s=20, what="backup removed")
        answer = _chat(url, "primary")
        assert answer.status_code == 503 and "x-gateway-fallback-from" not in answer.headers, answer.text
        assert len(streams.outcomes) < 24, "every stream ended before the removal: the test proves nothing"
    assert len(streams.outcomes) == 24
    assert all(o[:2] == (200, "backup") and o[2] >= 60 and o[3] for o in streams.outcomes), streams.outcomes
    assert_no_lua_errors(stack)
