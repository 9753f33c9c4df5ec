"""The OpenAI-compatible routes of the tgi / vllm / sglang simulators."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.unit

GENERATORS = ["tgi", "vllm", "sglang"]
CHAT = {"model": "qwen2", "messages": [{"role": "user", "content": "Hello there, how are you?"}]}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def read_sse(response: httpx.Response) -> list[tuple[float, str]]:
    """(arrival time, data payload) of each SSE event."""
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            events.append((time.monotonic(), line[len("data: ") :]))
    return events


@pytest.mark.parametrize("engine", GENERATORS)
def test_chat_completion_shape(sim, engine):
    async def main():
        async with sim(engine) as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
            assert r.status_code == 200
            assert r.headers["x-sim-endpoint-id"] == "qwen2-0"
            body = r.json()
            assert body["object"] == "chat.completion"
            assert body["id"].startswith("chatcmpl-")
            assert isinstance(body["created"], int)
            assert body["model"] == "qwen2"
            assert body["system_fingerprint"] == "qwen2-0"
            (choice,) = body["choices"]
            assert choice["index"] == 0
            assert choice["finish_reason"] == "length"
            assert choice["message"]["role"] == "assistant"
            content = choice["message"]["content"]
            assert len(content.split()) == 5 and content.startswith(" ")
            usage = body["usage"]
            assert usage["completion_tokens"] == 5
            assert usage["prompt_tokens"] > 0
            assert usage["total_tokens"] == usage["prompt_tokens"] + 5

            # no limit given: --default-max-tokens, reported as a natural stop
            r = await c.post("/v1/chat/completions", json=CHAT)
            body = r.json()
            assert body["usage"]["completion_tokens"] == 32
            assert body["choices"][0]["finish_reason"] == "stop"

    run(main())


@pytest.mark.parametrize("engine", GENERATORS)
def test_completion_shape_and_stream(sim, engine):
    async def main():
        async with sim(engine) as s, httpx.AsyncClient(base_url=s.url) as c:
            req = {"model": "qwen2", "prompt": "Once upon a time", "max_tokens": 4}
            r = await c.post("/v1/completions", json=req)
            body = r.json()
            assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
            assert body["system_fingerprint"] == "qwen2-0" and body["model"] == "qwen2"
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
            text = body["choices"][0]["text"]

            async with c.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [e for _, e in await read_sse(r)]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert all(ch["object"] == "text_completion" for ch in chunks)
            assert all(ch["system_fingerprint"] == "qwen2-0" for ch in chunks)
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == text  # deterministic text
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"

            # token-id prompts count one token per id
            r = await c.post("/v1/completions", json={"prompt": [1, 2, 3, 4, 5, 6], "max_tokens": 1})
            assert r.json()["usage"]["prompt_tokens"] == 6

    run(main())


@pytest.mark.parametrize("engine", GENERATORS)
def test_chat_stream_is_spread_over_time(sim, engine):
    async def main():
        async with (
            sim(engine, decode_ms_per_token=20, prefill_base_ms=5) as s,
            httpx.AsyncClient(base_url=s.url) as c,
        ):
            req = {**CHAT, "max_tokens": 5, "stream": True}
            async with c.stream("POST", "/v1/chat/completions", json=req) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                assert r.headers["x-sim-endpoint-id"] == "qwen2-0"
                events = await read_sse(r)
        assert events[-1][1] == "[DONE]"
        chunks = [(t, json.loads(e)) for t, e in events[:-1]]
        first = chunks[0][1]
        assert first["object"] == "chat.completion.chunk"
        assert first["choices"][0]["delta"]["role"] == "assistant"
        content = [(t, ch) for t, ch in chunks if ch["choices"][0]["delta"].get("content")]
        assert len(content) == 5
        last = chunks[-1][1]
        assert last["choices"][0]["finish_reason"] == "length"
        assert all(ch["choices"][0]["finish_reason"] is None for _, ch in content)
        for _, ch in chunks:
            assert (
                ch["id"] == first["id"] and ch["model"] == "qwen2" and ch["system_fingerprint"] == "qwen2-0"
            )
            assert "created" in ch
        # 5 tokens at 20 ms per decode step: 4 steps between the first and the last token
        assert chunks[-1][0] - chunks[0][0] >= 0.06
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(content)]
        assert sum(1 for g in gaps if g >= 0.01) >= 3, gaps

    run(main())


@pytest.mark.parametrize("engine", GENERATORS)
def test_stream_include_usage(sim, engine):
    async def main():
        async with sim(engine) as s, httpx.AsyncClient(base_url=s.url) as c:
            req = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
            async with c.stream("POST", "/v1/chat/completions", json=req) as r:
                events = [e for _, e in await read_sse(r)]
            assert events[-1] == "[DONE]"
            usage_chunk = json.loads(events[-2])
            assert usage_chunk["choices"] == []
            assert usage_chunk["usage"]["completion_tokens"] == 3
            total = usage_chunk["usage"]["prompt_tokens"] + 3
            assert usage_chunk["usage"]["total_tokens"] == total
            # without include_usage there is no usage chunk
            async with c.stream("POST", "/v1/chat/completions", json={**req, "stream_options": None}) as r:
                events = [e for _, e in await read_sse(r)]
            assert all("usage" not in json.loads(e) for e in events[:-1])

    run(main())


@pytest.mark.parametrize(("engine", "shape"), [("vllm", "openai"), ("sglang", "openai"), ("tgi", "tgi")])
def test_bad_requests_are_400_in_engine_shape(sim, engine, shape):
    async def main():
        async with sim(engine) as s, httpx.AsyncClient(base_url=s.url) as c:
            bad = [
                ("/v1/chat/completions", b"{not json"),
                ("/v1/chat/completions", b"[1, 2]"),
                ("/v1/chat/completions", json.dumps({"model": "qwen2"}).encode()),
                ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
                ("/v1/chat/completions", json.dumps({**CHAT, "n": 2}).encode()),
                ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": "x"}).encode()),
                (
                    "/v1/chat/completions",
                    json.dumps({**CHAT, "stream_options": {"include_usage": True}}).encode(),
                ),
                ("/v1/completions", json.dumps({"model": "qwen2"}).encode()),
                ("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode()),
            ]
            for path, content in bad:
                r = await c.post(path, content=content, headers={"content-type": "application/json"})
                assert r.status_code == 400, (path, content, r.text)
                body = r.json()
                if shape == "openai":
                    assert body["object"] == "error" and body["code"] == 400
                    assert body["type"] == "BadRequestError" and body["message"]
                else:
                    assert set(body) == {"error", "error_type"}
            assert s.engine.stats.failures["validation"] == len(bad)

    run(main())


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_unknown_model_is_404_like_vllm(sim, engine):
    async def main():
        async with (
            sim(engine, served_names=("qwen", "my-model")) as s,
            httpx.AsyncClient(base_url=s.url) as c,
        ):
            r = await c.post("/v1/chat/completions", json={**CHAT, "model": "llama"})
            assert r.status_code == 404
            assert r.json() == {
                "object": "error",
                "message": "The model `llama` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
            r = await c.post("/v1/completions", json={"model": "llama", "prompt": "x"})
            assert r.status_code == 404
            for name in ("qwen2", "qwen", "my-model"):
                r = await c.post("/v1/chat/completions", json={**CHAT, "model": name, "max_tokens": 1})
                assert r.status_code == 200
                assert r.json()["model"] == "qwen2"
            models = (await c.get("/v1/models")).json()
            assert models["object"] == "list"
            assert [m["id"] for m in models["data"]] == ["qwen2", "qwen", "my-model"]
            for m in models["data"]:
                assert m["object"] == "model" and m["owned_by"] == engine and m["root"] == "qwen2"
                assert m["parent"] is None and m["max_model_len"] > 0 and isinstance(m["created"], int)

    run(main())


def test_tgi_accepts_any_model_and_reports_its_id(sim):
    async def main():
        async with sim("tgi") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tgi", "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == "qwen2"
            models = (await c.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["qwen2"]

    run(main())


def test_same_request_same_text_and_seed_changes_it(sim):
    async def main():
        async with sim("vllm") as s, httpx.AsyncClient(base_url=s.url) as c:
            texts = []
            for extra in ({}, {}, {"seed": 7}):
                r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, **extra})
                texts.append(r.json()["choices"][0]["message"]["content"])
            assert texts[0] == texts[1] != texts[2]

    run(main())


def test_context_length_limit(sim):
    async def main():
        async with sim("vllm", max_model_len=100) as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/v1/completions", json={"prompt": "x" * 400, "max_tokens": 10})
            assert r.status_code == 400
            assert "maximum context length is 100 tokens" in r.json()["message"]
        async with sim("tgi", max_model_len=100) as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/v1/completions", json={"prompt": "x" * 400, "max_tokens": 10})
            assert r.status_code == 422
            assert r.json()["error_type"] == "validation"

    run(main())


def test_engine_specific_info_routes(sim):
    async def main():
        async with sim("vllm") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.get("/version")
            assert r.status_code == 200 and isinstance(r.json()["version"], str)
            r = await c.get("/health")
            assert r.status_code == 200 and r.content == b""
        async with sim("sglang") as s, httpx.AsyncClient(base_url=s.url) as c:
            info = (await c.get("/get_model_info")).json()
            assert info["model_path"] == "qwen2" and info["is_generation"] is True
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/get_server_info")).json()["model_path"] == "qwen2"

    run(main())
