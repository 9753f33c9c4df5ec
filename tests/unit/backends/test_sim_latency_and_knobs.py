"""Latency model, queueing and the /sim/* runtime knobs."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from backends.simulator.config import make_config
from backends.simulator.engine import Engine, Job

pytestmark = pytest.mark.unit

CHAT = {"model": "qwen2", "messages": [{"role": "user", "content": "Hello"}]}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def ttft(c: httpx.AsyncClient, prompt: str) -> float:
    """Seconds from sending a streaming completion to its first token chunk."""
    start = time.monotonic()
    first = None
    async with c.stream(
        "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "stream": True}
    ) as r:
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic() - start
    assert first is not None
    return first


def test_ttft_grows_with_prompt_length(sim):
    async def main():
        async with (
            sim("vllm", prefill_base_ms=5, prefill_per_token_ms=0.1, decode_ms_per_token=1) as s,
            httpx.AsyncClient(base_url=s.url) as c,
        ):
            short = await ttft(c, "hi " * 10)  # ~8 tokens: ~6 ms
            long = await ttft(c, "word " * 2000)  # 2500 tokens: ~255 ms
        assert long - short >= 0.2, (short, long)
        assert short < 0.1

    run(main())


def test_queueing_with_max_batch(sim):
    async def main():
        async with (
            sim("vllm", max_batch=2, prefill_base_ms=0, prefill_per_token_ms=0, decode_ms_per_token=20) as s,
            httpx.AsyncClient(base_url=s.url, timeout=10) as c,
        ):
            waiting_seen: list[float] = []
            running_seen: list[float] = []
            done = asyncio.Event()

            async def poll() -> None:
                while not done.is_set():
                    text = (await c.get("/metrics")).text
                    for line in text.splitlines():
                        if line.startswith("vllm:num_requests_waiting{"):
                            waiting_seen.append(float(line.rsplit(" ", 1)[1]))
                        if line.startswith("vllm:num_requests_running{"):
                            running_seen.append(float(line.rsplit(" ", 1)[1]))
                    await asyncio.sleep(0.01)

            poller = asyncio.create_task(poll())
            start = time.monotonic()
            req = {**CHAT, "max_tokens": 5}
            responses = await asyncio.gather(*(c.post("/v1/chat/completions", json=req) for _ in range(6)))
            elapsed = time.monotonic() - start
            done.set()
            await poller
            assert all(r.status_code == 200 for r in responses)
            # 6 requests, 2 at a time, ~80 ms each (4 decode steps): three waves
            assert elapsed >= 0.2, elapsed
            assert max(waiting_seen) > 0
            assert max(running_seen) == 2
            state = (await c.get("/sim/state")).json()
            assert state["served"] == 6 and state["queue"] == 0 and state["running"] == 0
            assert s.engine.stats.queue_time.count == 6
            assert s.engine.stats.queue_time.total > 0.2  # the later waves waited

    run(main())


def test_full_queue_answers_503(sim):
    async def main():
        async with (
            sim("vllm", max_batch=1, max_queue=1, decode_ms_per_token=20) as s,
            httpx.AsyncClient(base_url=s.url, timeout=10) as c,
        ):
            req = {**CHAT, "max_tokens": 3}
            responses = await asyncio.gather(*(c.post("/v1/chat/completions", json=req) for _ in range(3)))
            codes = sorted(r.status_code for r in responses)
            assert codes == [200, 200, 503]
            err = next(r for r in responses if r.status_code == 503).json()
            assert err["object"] == "error" and err["code"] == 503
            assert s.engine.stats.failures["overloaded"] == 1

    run(main())


@pytest.mark.parametrize("engine", ["vllm", "tgi"])
def test_error_rate_one_fails_everything(sim, engine):
    async def main():
        async with sim(engine) as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/sim/control", json={"error_rate": 1.0})
            assert r.status_code == 200 and r.json()["error_rate"] == 1.0
            for _ in range(3):
                r = await c.post("/v1/chat/completions", json=CHAT)
                assert r.status_code == 500
                body = r.json()
                if engine == "vllm":
                    assert body["object"] == "error" and body["code"] == 500
                else:
                    assert body["error_type"] == "generation"
            async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status_code == 500
            await c.post("/sim/control", json={"error_rate": 0})
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert s.engine.stats.failures["generation"] == 4

    run(main())


def test_error_rate_from_config_is_a_fraction(sim):
    async def main():
        async with (
            sim("vllm", profile="instant", error_rate=0.5, seed=3) as s,
            httpx.AsyncClient(base_url=s.url) as c,
        ):
            codes = [
                (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code
                for _ in range(60)
            ]
        assert 10 < codes.count(500) < 50
        assert set(codes) == {200, 500}

    run(main())


def test_hang_keeps_control_plane_responsive(sim):
    async def main():
        async with sim("vllm") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/sim/control", json={"hang": True})
            assert r.json()["hang"] is True
            pending = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2}))
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/chat/completions", json=CHAT, timeout=0.3)
            state = (await c.get("/sim/state", timeout=1)).json()
            assert state["hang"] is True and state["hung"] >= 1
            assert (await c.get("/health", timeout=1)).status_code == 200
            assert (await c.get("/metrics", timeout=1)).status_code == 200
            assert not pending.done()
            await c.post("/sim/control", json={"hang": False})
            r = await asyncio.wait_for(pending, 5)  # held requests resume
            assert r.status_code == 200
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
            await asyncio.sleep(0.05)
            assert (await c.get("/sim/state")).json()["hung"] == 0

    run(main())


def test_healthy_knob(sim):
    async def main():
        async with sim("vllm") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.get("/health")
            assert r.status_code == 200 and r.content == b""
            assert (await c.post("/sim/control", json={"healthy": False})).json()["healthy"] is False
            assert (await c.get("/health")).status_code == 503
            await c.post("/sim/control", json={"healthy": True})
            assert (await c.get("/health")).status_code == 200

    run(main())


def test_crash_answers_then_exits(sim):
    async def main():
        async with sim("vllm") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/sim/control", json={"crash": True})
            assert r.status_code == 200 and r.json()["crash"] is True
            assert s.exits == []
            await asyncio.sleep(0.2)
            assert s.exits == [1]

    run(main())


def test_control_validation_and_profile(sim):
    async def main():
        async with sim("vllm") as s, httpx.AsyncClient(base_url=s.url) as c:
            for bad in ({"nope": 1}, {"slowdown": 0}, {"error_rate": 2}, {"hang": "yes"}, {"profile": "x"}):
                r = await c.post("/sim/control", json=bad)
                assert r.status_code == 400, bad
                assert r.json()["object"] == "error"
            assert (await c.post("/sim/control", content=b"nope")).status_code == 400
            state = (await c.post("/sim/control", json={"profile": "slow", "slowdown": 3.0})).json()
            assert state["profile"] == "slow"
            assert state["decode_ms_per_token"] == 45.0 and state["prefill_base_ms"] == 60.0
            assert state["slowdown"] == 3.0
            state = (await c.post("/sim/control", json={"profile": "instant", "max_batch": 4})).json()
            assert state["decode_ms_per_token"] == 0 and state["max_batch"] == 4
            assert (await c.get("/sim/state")).json() == state

    run(main())


def test_slowdown_and_batch_size_slow_decode_steps():
    async def main():
        engine = Engine(make_config("vllm", "m", "e", decode_ms_per_token=10))
        assert engine.decode_step_seconds() == pytest.approx(0.010)
        engine.apply_control({"slowdown": 2.0})
        assert engine.decode_step_seconds() == pytest.approx(0.020)
        async with engine.generation(Job(prompt_tokens=1, max_tokens=1)), engine.generation(Job(1, 1)):
            assert engine.running == 2
            assert engine.decode_step_seconds() == pytest.approx(0.020 * 1.02)
        assert engine.running == 0
        assert engine.stats.failures["cancelled"] == 2

    run(main())


def test_client_disconnect_releases_the_batch_slot(sim):
    async def main():
        async with sim("vllm", decode_ms_per_token=50) as s:
            async with httpx.AsyncClient(base_url=s.url) as c:
                req = {**CHAT, "max_tokens": 100, "stream": True}
                async with c.stream("POST", "/v1/chat/completions", json=req) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and "content" in line:
                            break
                assert s.engine.running == 1
            for _ in range(100):
                if s.engine.running == 0:
                    break
                await asyncio.sleep(0.01)
            assert s.engine.running == 0
            assert s.engine.stats.failures["cancelled"] == 1

    run(main())


def test_finished_stream_chunks_are_valid_json(sim):
    async def main():
        async with sim("sglang", profile="instant") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 50})
            events = [ln[6:] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert len(events) == 50 + 3  # role, 50 tokens, finish
            for e in events[:-1]:
                json.loads(e)

    run(main())
