"""TGI's own routes: /generate, /generate_stream, /, /info, /health."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.unit


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_generate_plain_and_with_details(sim):
    async def main():
        async with sim("tgi") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post(
                "/generate", json={"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 6}}
            )
            assert r.status_code == 200
            assert r.headers["x-sim-endpoint-id"] == "qwen2-0"
            assert r.headers["x-generated-tokens"] == "6"
            assert r.headers["x-prompt-tokens"] == "6"
            body = r.json()
            assert set(body) == {"generated_text"}
            assert len(body["generated_text"].split()) == 6

            req = {
                "inputs": "What is Deep Learning?",
                "parameters": {
                    "max_new_tokens": 6,
                    "details": True,
                    "decoder_input_details": True,
                    "seed": 5,
                },
            }
            body = (await c.post("/generate", json=req)).json()
            details = body["details"]
            assert details["finish_reason"] == "length"
            assert details["generated_tokens"] == 6
            assert details["seed"] == 5
            assert len(details["prefill"]) == 6
            assert len(details["tokens"]) == 6
            for tok in details["tokens"]:
                assert set(tok) == {"id", "text", "logprob", "special"}
                assert tok["special"] is False
            assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]

            body = (await c.post("/generate", json={"inputs": "hi", "parameters": {"details": True}})).json()
            assert body["details"]["generated_tokens"] == 32
            assert body["details"]["finish_reason"] == "eos_token"

            body = (
                await c.post("/generate", json={"inputs": "hi", "parameters": {"return_full_text": True}})
            ).json()
            assert body["generated_text"].startswith("hi ")

    run(main())


def test_generate_stream_events(sim):
    async def main():
        async with sim("tgi", decode_ms_per_token=5) as s, httpx.AsyncClient(base_url=s.url) as c:
            req = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 4}}
            async with c.stream("POST", "/generate_stream", json=req) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]
            assert [e["index"] for e in events] == [1, 2, 3, 4]
            for e in events[:-1]:
                assert e["generated_text"] is None and e["details"] is None
                assert set(e["token"]) == {"id", "text", "logprob", "special"}
            last = events[-1]
            assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
            assert last["details"]["finish_reason"] == "length"
            assert last["details"]["generated_tokens"] == 4

    run(main())


def test_root_answers_as_tgi_does(sim):
    """TGI's `POST /` (what `text_generation.Client` and `InferenceClient(base_url=...)` call): a list of
    one `/generate` answer, or `/generate_stream`'s events when the body says `"stream": true`."""

    async def main():
        async with sim("tgi") as s, httpx.AsyncClient(base_url=s.url) as c:
            req = {"inputs": "x", "parameters": {"max_new_tokens": 2, "details": True}}
            r = await c.post("/", json=req)
            assert r.status_code == 200
            assert r.headers["x-generated-tokens"] == "2"
            body = r.json()
            assert isinstance(body, list) and len(body) == 1, body
            assert len(body[0]["generated_text"].split()) == 2
            assert body[0]["details"]["generated_tokens"] == 2
            # The same generation as /generate's (the simulator is deterministic per input).
            assert body[0] == (await c.post("/generate", json=req)).json()

            r = await c.post("/", json={**req, "stream": True})
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
            assert [e["index"] for e in events] == [1, 2]
            assert events[-1]["generated_text"] == body[0]["generated_text"]

            r = await c.post("/", json={"parameters": {}})
            assert r.status_code == 400

    run(main())


def test_generate_validation_errors(sim):
    async def main():
        async with sim("tgi", max_model_len=64) as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/generate", json={"parameters": {}})
            assert r.status_code == 400
            assert set(r.json()) == {"error", "error_type"}
            r = await c.post("/generate", content=b"{", headers={"content-type": "application/json"})
            assert r.status_code == 400
            r = await c.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 0}})
            assert r.status_code == 400
            r = await c.post("/generate", json={"inputs": "x" * 1000})
            assert r.status_code == 422
            assert r.json()["error_type"] == "validation"
            assert "must be <= 64" in r.json()["error"]
            assert s.engine.stats.failures["validation"] == 4

    run(main())


def test_info_health_models(sim):
    async def main():
        async with sim("tgi", max_batch=8, max_queue=10) as s, httpx.AsyncClient(base_url=s.url) as c:
            info = (await c.get("/info")).json()
            assert info["model_id"] == "qwen2"
            for key in (
                "model_dtype",
                "max_input_tokens",
                "max_total_tokens",
                "max_concurrent_requests",
                "max_batch_total_tokens",
                "version",
                "router",
                "sha",
            ):
                assert key in info, key
            assert info["max_concurrent_requests"] == 18
            assert info["max_input_tokens"] < info["max_total_tokens"]
            assert info["router"] == "text-generation-router"
            assert (await c.get("/health")).status_code == 200
            models = (await c.get("/v1/models")).json()
            assert models["data"][0]["id"] == "qwen2"

    run(main())
