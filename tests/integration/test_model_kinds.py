"""Every model kind of the default stack (`make run`'s models.yaml) through a real Envoy, with real clients.

The registry is the shipped one, its loopback ports moved to free ones (as `SIM_PORTS=auto` does), so the
chat models, the TEI embedder and the TEI reranker a new user gets are what is tested: the official
`openai` SDK (sync and async), Hugging Face's `InferenceClient`, and plain HTTP for rerank, each with no
custom header (the model is named in the body).
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from huggingface_hub import InferenceClient

from control_plane.devstack.ports import parse_sim_ports, remap_registry
from control_plane.devstack.stack import LocalStack, StackSettings
from tests.support.gateway import admin_client, eventually
from tests.support.registries import write

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EMBEDDER = "bge-m3"
RERANKER = "bge-reranker-v2-m3"
QUERY = "what is deep learning"
DOCS = ["the weather is nice", "deep learning with neural networks", "cooking pasta at home"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One stack for the module: starting six simulators, a control plane and an Envoy is the slow part."""
    tmp = tmp_path_factory.mktemp("kinds")
    doc = yaml.safe_load((REPO / "models.yaml").read_text())
    ports = parse_sim_ports("auto")
    assert ports is not None
    doc = remap_registry(doc, ports)
    doc["gateway"] = {"expose_upstream_host": True}  # Envoy on a free port, not the shipped 8080
    local = LocalStack(
        StackSettings(config_path=write(tmp / "models.yaml", doc), work_dir=tmp / "stack", sim_profile="fast")
    )
    try:
        local.start()
        yield local
    finally:
        local.stop()


def _url(stack: LocalStack) -> str:
    return stack.envoys[0].url


def _b64_floats(value: str) -> list[float]:
    raw = base64.b64decode(value)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_default_stack_lists_every_kind(stack: LocalStack) -> None:
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused")
    ids = {m.id for m in client.models.list()}
    assert {"qwen2", "llama3", EMBEDDER, RERANKER} <= ids, ids


def test_openai_sdk_sync_embeddings_are_deterministic(stack: LocalStack) -> None:
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused", max_retries=0)
    single = client.embeddings.create(model=EMBEDDER, input="hello world", encoding_format="float")
    assert single.model == EMBEDDER and len(single.data) == 1
    vector = single.data[0].embedding
    assert len(vector) > 0 and math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-5)
    assert single.usage.prompt_tokens > 0
    # An alias names the same model; a list keeps its order; same text → same vector.
    batch = client.embeddings.create(
        model="BAAI/bge-m3", input=["other text", "hello world"], encoding_format="float"
    )
    assert [d.index for d in batch.data] == [0, 1]
    assert batch.data[1].embedding == pytest.approx(vector, abs=1e-7)
    assert batch.data[0].embedding != pytest.approx(vector, abs=1e-3)
    # The SDK's default asks for base64 and decodes it; the raw base64 answer decodes to the same floats.
    default = client.embeddings.create(model=EMBEDDER, input="hello world")
    assert default.data[0].embedding == pytest.approx(vector, abs=1e-6)
    raw = client.embeddings.with_raw_response.create(
        model=EMBEDDER, input="hello world", encoding_format="base64"
    )
    assert _b64_floats(raw.http_response.json()["data"][0]["embedding"]) == pytest.approx(vector, abs=1e-6)


def test_openai_sdk_async_embeddings(stack: LocalStack) -> None:
    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=f"{_url(stack)}/v1", api_key="unused", max_retries=0) as c:
            answers = await asyncio.gather(
                *(
                    c.embeddings.create(model=EMBEDDER, input=["a", "b"], encoding_format=f)
                    for f in ("float", "base64")
                )
            )
        # Asked for explicitly, base64 comes back as the string the server sent (the SDK decodes only
        # the base64 it asked for on its own).
        floats, b64 = answers
        return [d.embedding for d in floats.data] + [_b64_floats(str(d.embedding)) for d in b64.data]

    a_float, b_float, a_b64, b_b64 = asyncio.run(main())
    assert a_float == pytest.approx(a_b64, abs=1e-6) and b_float == pytest.approx(b_b64, abs=1e-6)
    assert a_float != pytest.approx(b_float, abs=1e-3)


def test_embedding_model_errors_are_openai_errors(stack: LocalStack) -> None:
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedder", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=EMBEDDER, input=[], encoding_format="float")


def test_tei_native_embed_and_both_rerank_apis_route_on_the_body_model(stack: LocalStack) -> None:
    url = _url(stack)
    with httpx.Client(base_url=url, timeout=15) as client:
        embed = client.post("/embed", json={"model": EMBEDDER, "inputs": ["hello world"]})
        assert embed.status_code == 200, embed.text
        assert embed.headers["x-served-by-endpoint"] == "bge-m3-tei-0"
        openai_float = client.post(
            "/v1/embeddings", json={"model": EMBEDDER, "input": "hello world", "encoding_format": "float"}
        ).json()
        assert embed.json()[0] == pytest.approx(openai_float["data"][0]["embedding"], abs=1e-7)

        native = client.post("/rerank", json={"model": RERANKER, "query": QUERY, "texts": DOCS})
        assert native.status_code == 200, native.text
        assert native.headers["x-served-by-endpoint"] == "bge-reranker-tei-0"
        assert native.json()[0]["index"] == 1  # the one document that shares words with the query
        again = client.post("/rerank", json={"model": "bge-reranker", "query": QUERY, "texts": DOCS})
        assert again.json() == native.json()  # deterministic, and the alias names the same model

        v1 = client.post(
            "/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": DOCS, "top_n": 2}
        )
        assert v1.status_code == 200, v1.text
        body = v1.json()
        assert body["model"] == RERANKER and len(body["results"]) == 2
        assert [r["index"] for r in body["results"]] == [r["index"] for r in native.json()[:2]]
        assert body["results"][0]["document"] == {"text": DOCS[1]}

        missing = client.post("/rerank", json={"query": QUERY, "texts": DOCS})
        assert missing.status_code == 400 and "model" in missing.json()["error"]["message"]


def test_huggingface_inference_client_chat_completion_without_header(stack: LocalStack) -> None:
    client = InferenceClient(base_url=_url(stack), timeout=30)
    for name in ("qwen2", "llama3"):
        answer = client.chat_completion(
            messages=[{"role": "user", "content": "Hello"}], model=name, max_tokens=8
        )
        assert answer.choices[0].message.content
        assert answer.usage.completion_tokens > 0


def test_new_kinds_are_health_probed_and_scraped(stack: LocalStack) -> None:
    with admin_client(stack) as admin:

        def endpoint(endpoint_id: str) -> dict[str, Any]:
            response = admin.get(f"/admin/endpoints/{endpoint_id}")
            assert response.status_code == 200, response.text
            return dict(response.json())

        for endpoint_id in ("bge-m3-tei-0", "bge-reranker-tei-0"):
            eventually(lambda e=endpoint_id: endpoint(e)["health"] == "healthy", 30, f"{endpoint_id} healthy")
            eventually(
                lambda e=endpoint_id: (endpoint(e)["signals"] or {}).get("queue_depth") is not None,
                30,
                f"{endpoint_id} scraped",
            )


def test_huggingface_inference_client_feature_extraction_without_header(stack: LocalStack) -> None:
    # InferenceClient posts feature_extraction to its base URL itself with no model in the body: the model
    # is named in the path, and the gateway sends the request to TEI's root route.
    client = InferenceClient(base_url=f"{_url(stack)}/models/{EMBEDDER}", timeout=30)
    single = client.feature_extraction("hello world")
    batch = client.feature_extraction(["other text", "hello world"])
    assert single.shape[0] == 1 and batch.shape[0] == 2 and batch.shape[1] == single.shape[1]
    with httpx.Client(timeout=15) as http:
        reference = http.post(
            f"{_url(stack)}/v1/embeddings",
            json={"model": EMBEDDER, "input": "hello world", "encoding_format": "float"},
        ).json()["data"][0]["embedding"]
    assert single[0].tolist() == pytest.approx(reference, abs=1e-6)
    assert batch[1].tolist() == pytest.approx(reference, abs=1e-6)
    assert batch[0].tolist() != pytest.approx(reference, abs=1e-3)
