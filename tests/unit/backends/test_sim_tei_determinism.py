"""The TEI simulator's answers are a function of the input alone, so clients can be tested on them.

Two separate simulator instances (think: two replicas, or two runs) must give the same vector for the
same text on every API (/embed, /v1/embeddings float and base64), different vectors for different
texts, and the same rerank scores; /v1/rerank (Jina/Cohere shape) agrees with TEI's /rerank.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.unit

TEXTS = ["what is deep learning", "the weather is nice today", "深度学习是什么", ""]
QUERY = "what is deep learning"
DOCS = ["the weather is nice", "deep learning with neural networks", "deep learning", "cooking pasta"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _embed_everywhere(url: str, texts: list[str]) -> dict[str, list[list[float]]]:
    async with httpx.AsyncClient(base_url=url) as c:
        native = (await c.post("/embed", json={"inputs": texts, "model": "ignored-by-tei"})).json()
        floats = (await c.post("/v1/embeddings", json={"input": texts, "model": "x"})).json()
        b64 = (
            await c.post("/v1/embeddings", json={"input": texts, "model": "x", "encoding_format": "base64"})
        ).json()
    decoded = []
    for item in b64["data"]:
        raw = base64.b64decode(item["embedding"])
        decoded.append(list(struct.unpack(f"<{len(raw) // 4}f", raw)))
    return {"native": native, "float": [d["embedding"] for d in floats["data"]], "base64": decoded}


def test_embeddings_are_a_function_of_the_text(sim):
    async def main():
        async with sim("tei", model_id="bge-m3") as a, sim("tei", model_id="bge-m3", endpoint_id="b") as b:
            texts = [t for t in TEXTS if t]
            first = await _embed_everywhere(a.url, texts)
            second = await _embed_everywhere(b.url, texts)
            # Same text → same vector, on another instance and on every API.
            assert first["native"] == second["native"]
            assert first["native"] == first["float"]
            for got, want in zip(first["base64"], first["float"], strict=True):
                assert got == pytest.approx(want, abs=1e-6)
            # Different texts → different (and far from parallel) unit vectors.
            vectors = first["native"]
            for v in vectors:
                assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-6)
            for i in range(len(vectors)):
                for j in range(i + 1, len(vectors)):
                    cosine = sum(x * y for x, y in zip(vectors[i], vectors[j], strict=True))
                    assert abs(cosine) < 0.5, (texts[i], texts[j], cosine)
            # A text's vector does not depend on its batch neighbours or position.
            async with httpx.AsyncClient(base_url=a.url) as c:
                alone = (await c.post("/embed", json={"inputs": texts[1]})).json()
            assert alone == [vectors[1]]

    run(main())


def test_empty_text_is_embedded_too(sim):
    async def main():
        async with sim("tei") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post("/embed", json={"inputs": [""]})
            assert r.status_code == 200 and len(r.json()[0]) == 384

    run(main())


def test_rerank_scores_are_deterministic_and_agree_across_apis(sim):
    async def main():
        async with (
            sim("tei", model_id="rr") as a,
            sim("tei", model_id="rr", endpoint_id="b") as b,
            httpx.AsyncClient(base_url=a.url) as ca,
            httpx.AsyncClient(base_url=b.url) as cb,
        ):
            body = {"query": QUERY, "texts": DOCS, "model": "ignored-by-tei"}
            native_a = (await ca.post("/rerank", json=body)).json()
            native_b = (await cb.post("/rerank", json=body)).json()
            assert native_a == native_b
            r = await ca.post("/v1/rerank", json={"model": "rr", "query": QUERY, "documents": DOCS})
            assert r.status_code == 200
            jina = r.json()
            assert jina["model"] == "rr" and jina["id"].startswith("rerank-")
            assert jina["usage"]["total_tokens"] > 0
            assert [x["index"] for x in jina["results"]] == [x["index"] for x in native_a]
            for got, want in zip(jina["results"], native_a, strict=True):
                assert got["relevance_score"] == pytest.approx(want["score"])
                assert got["document"] == {"text": DOCS[got["index"]]}
            # The most relevant documents share words with the query; the unrelated one is last.
            assert jina["results"][-1]["index"] in (0, 3)
            assert {x["index"] for x in jina["results"][:2]} == {1, 2}

    run(main())


def test_v1_rerank_top_n_return_documents_and_errors(sim):
    async def main():
        async with sim("tei") as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.post(
                "/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False}
            )
            results = r.json()["results"]
            assert len(results) == 2 and all(set(x) == {"index", "relevance_score"} for x in results)
            assert results[0]["relevance_score"] >= results[1]["relevance_score"]
            for bad in (
                {"documents": DOCS},
                {"query": QUERY},
                {"query": QUERY, "documents": []},
                {"query": QUERY, "documents": DOCS, "top_n": 0},
                {"query": QUERY, "documents": DOCS, "top_n": "2"},
                {"query": QUERY, "documents": DOCS, "return_documents": "yes"},
            ):
                r = await c.post("/v1/rerank", json=bad)
                assert r.status_code == 400, bad
                assert "error" in r.json()
            r = await c.post("/v1/rerank", json={"query": QUERY, "documents": ["d"] * 33})
            assert r.status_code == 413

    run(main())


def test_root_route_embeds_or_reranks_as_tei_does(sim):
    async def main():
        async with sim("tei") as s, httpx.AsyncClient(base_url=s.url) as c:
            # What huggingface_hub's feature_extraction sends to a TEI base URL.
            r = await c.post("/", json={"inputs": "hello world", "parameters": {}})
            assert r.status_code == 200
            assert r.json() == (await c.post("/embed", json={"inputs": "hello world"})).json()
            body = {"query": QUERY, "texts": DOCS}
            r = await c.post("/", json=body)
            assert r.json() == (await c.post("/rerank", json=body)).json()
            assert (await c.post("/", content=b"not json")).status_code == 400
            assert (await c.post("/", json={"parameters": {}})).status_code == 400

    run(main())
