"""The official ``openai`` client against the vLLM simulator."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.unit

MESSAGES = [{"role": "user", "content": "Say hello"}]


def test_openai_client_chat_and_completions(threaded_sim):
    with threaded_sim("vllm", served_names=("qwen",)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)

        chat = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=4)
        assert chat.model == "qwen2"
        assert chat.system_fingerprint == "qwen2-0"
        assert chat.choices[0].finish_reason == "length"
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens == 4

        stream = client.chat.completions.create(
            model="qwen2",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat.choices[0].message.content  # same prompt, same text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)

        completion = client.completions.create(model="qwen2", prompt="Hello", max_tokens=3)
        assert completion.choices[0].text and completion.usage is not None

        models = client.models.list()
        assert [m.id for m in models.data] == ["qwen2", "qwen"]

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="qwen2", messages=MESSAGES, n=2)


def test_openai_client_embeddings(threaded_sim):
    with threaded_sim("tei", model_id="bge-small") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)
        result = client.embeddings.create(model="bge-small", input=["hello", "world"])
        assert len(result.data) == 2 and len(result.data[0].embedding) == 384
