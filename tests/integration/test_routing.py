"""Requests reach the right model's endpoints through a real Envoy configured by the real control plane."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import StackFactory
from tests.support.gateway import chat, served_by

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(make_stack: StackFactory, two_models: dict[str, Any]) -> Any:
    return make_stack(two_models)


def test_routing_by_body_model_and_alias_reaches_only_that_models_endpoints(stack: Any) -> None:
    url = stack.envoys[0].url
    with httpx.Client(timeout=10) as client:
        for name, expected in (
            ("qwen2", {"qwen2-0", "qwen2-1"}),
            ("qwen", {"qwen2-0", "qwen2-1"}),
            ("llama3", {"llama3-0", "llama3-1"}),
            ("Llama-3.1-8B-Instruct", {"llama3-0", "llama3-1"}),
        ):
            seen = Counter()
            for _ in range(12):
                response = chat(client, url, name)
                assert response.status_code == 200, response.text
                seen[served_by(response)] += 1
                # Envoy names the upstream (host:port and endpoint id): routing is visible from outside.
                assert response.headers["x-served-by-endpoint"] == served_by(response)
                assert response.headers["x-served-by"].startswith("127.0.0.1:")
            assert set(seen) == expected, (name, seen)  # both replicas used, no other model's


def test_header_routes_when_the_body_has_no_model_but_never_overrides_the_body(stack: Any) -> None:
    url = stack.envoys[0].url
    with httpx.Client(timeout=10) as client:
        native = client.post(
            f"{url}/generate",
            headers={"x-model-id": "qwen2"},
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}},
        )
        assert native.status_code == 200, native.text
        assert native.headers["x-served-by-endpoint"].startswith("qwen2-")
        assert "generated_text" in native.json()

        both = client.post(
            f"{url}/v1/chat/completions",
            headers={"x-model-id": "qwen2"},
            json={"model": "llama3", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        )
        assert both.status_code == 200 and served_by(both).startswith("llama3-")


def test_models_list_in_openai_shape(stack: Any) -> None:
    client = openai.OpenAI(base_url=f"{stack.envoys[0].url}/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == ["qwen2", "llama3"]
    assert all(m.object == "model" for m in models.data)
    assert client.models.retrieve("qwen").id == "qwen2"


def test_openai_sdk_chat_and_completions_for_both_models(stack: Any) -> None:
    client = openai.OpenAI(base_url=f"{stack.envoys[0].url}/v1", api_key="unused")
    for model_id in ("qwen2", "llama3"):
        answer = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
        assert answer.choices[0].message.content
        assert answer.usage is not None and answer.usage.completion_tokens == 5
        text = client.completions.create(model=model_id, prompt="Once", max_tokens=3)
        assert text.choices[0].text and text.usage is not None and text.usage.completion_tokens == 3
        chunks = list(
            client.chat.completions.create(
                model=model_id,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_request_id_is_returned_and_a_client_id_is_kept(stack: Any) -> None:
    url = stack.envoys[0].url
    with httpx.Client(timeout=10) as client:
        response = chat(client, url, "qwen2")
        assert len(response.headers["x-request-id"]) >= 16
        mine = client.post(
            f"{url}/v1/chat/completions",
            headers={"x-request-id": "trace-abc-123"},
            json={"model": "qwen2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        )
        assert mine.headers["x-request-id"] == "trace-abc-123"
        error = client.post(f"{url}/v1/chat/completions", json={"model": "nope"})
        assert error.headers.get("x-request-id")
