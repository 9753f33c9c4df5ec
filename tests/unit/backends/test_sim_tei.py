"""The TEI simulator: /embed, /rerank, /v1/embeddings, /info."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.unit


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_embed(sim):
    async def main():
        async with (
            sim("tei", model_id="bge-small", endpoint_id="bge-0") as s,
            httpx.AsyncClient(base_url=s.url) as c,
        ):
            r = await c.post("/embed", json={"inputs": "hello world"})
            assert r.status_code == 200
            assert r.headers["x-sim-endpoint-id"] == "bge-0"
            (vec,) = r.json()
            assert len(vec) == 384
            assert math.isclose(math.sqrt(sum(x * x for x in vec)), 1.0, rel_tol=1e-6)
            batch = (await c.post("/embed", json={"inputs": ["hello world", "other text"]})).json()
            assert len(batch) == 2
            assert batch[0] == vec  # deterministic
            assert batch[1] != vec
            r = await c.post("/embed", json={"inputs": []})
            assert r.status_code == 400 and set(r.json()) == {"error", "error_type"}
            r = await c.post("/embed", json={"inputs": ["x"] * 33})
            assert r.status_code == 413
            r = await c.post("/embed", json={})
            assert r.status_code == 400
            # TEI does not generate
            assert (await c.post("/v1/chat/completions", json={"messages": []})).status_code == 404

    run(main())


def test_rerank(sim):
    async def main():
        async with sim("tei") as s, httpx.AsyncClient(base_url=s.url) as c:
            texts = ["the weather is nice", "deep learning with neural networks", "deep learning"]
            r = await c.post(
                "/rerank", json={"query": "what is deep learning", "texts": texts, "return_text": True}
            )
            assert r.status_code == 200
            results = r.json()
            assert sorted(x["index"] for x in results) == [0, 1, 2]
            scores = [x["score"] for x in results]
            assert scores == sorted(scores, reverse=True)
            assert all(0 <= sc <= 1 for sc in scores)
            assert results[-1]["index"] == 0  # no overlap with the query
            assert results[0]["text"] == texts[results[0]["index"]]
            assert (await c.post("/rerank", json={"texts": texts})).status_code == 400

    run(main())


def test_openai_embeddings_and_info(sim):
    async def main():
        async with sim("tei", model_id="bge-small") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/v1/embeddings", json={"input": ["a b c", "d"], "model": "anything"})
            body = r.json()
            assert body["object"] == "list" and body["model"] == "bge-small"
            assert [d["index"] for d in body["data"]] == [0, 1]
            assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
            assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
            r = await c.post("/v1/embeddings", json={"input": "a b c", "encoding_format": "base64"})
            raw = base64.b64decode(r.json()["data"][0]["embedding"])
            decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
            assert decoded == pytest.approx(body["data"][0]["embedding"], abs=1e-6)
            info = (await c.get("/info")).json()
            assert info["model_id"] == "bge-small" and "max_input_length" in info and "version" in info
            assert (await c.get("/health")).status_code == 200
            assert s.engine.stats.successes == 2

    run(main())
