"""The official client libraries, unchanged, against the gateway: OpenAI's SDK (sync and async) and
Hugging Face's `InferenceClient` on TGI's native API, with no custom header."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hi"}]


@pytest.fixture
def stack(make_stack: StackFactory) -> Any:
    return make_stack(
        registry(
            model("qwen2", "tgi", [free_port()], aliases=["qwen"]),
            model("llama3", "vllm", [free_port()]),
            model("org/name", "vllm", [free_port()]),
            model("off", "vllm", [free_port()], enabled=False),
            model("empty", "vllm", []),
            max_request_body_bytes=4096,
        )
    )


def requests_seen(stack: Any) -> int:
    """Requests the gateway has answered so far (Envoy's own counter): what a client's retries add to."""
    counter = "^http\\.gateway\\.downstream_rq_completed$"
    stats = httpx.get(f"{stack.envoys[0].admin_url}/stats", params={"format": "json", "filter": counter})
    return int(stats.json()["stats"][0]["value"])


def sdk(stack: Any, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.envoys[0].url}/v1", api_key="unused", timeout=30, **kwargs)


def test_openai_sdk_sync(stack: Any) -> None:
    client = sdk(stack)
    chat = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens == 4

    stream = client.chat.completions.create(
        model="llama3",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert not chunks[-1].choices  # the usage chunk comes last, on its own

    completion = client.completions.create(model="qwen2", prompt="Once upon", max_tokens=3)
    assert completion.choices[0].text and completion.usage and completion.usage.completion_tokens == 3

    assert [m.id for m in client.models.list()] == ["qwen2", "llama3", "org/name", "empty"]
    assert client.models.retrieve("qwen").id == "qwen2"
    # The SDK sends /v1/models/org%2Fname; Envoy unescapes it before routing.
    assert client.models.retrieve("org/name").id == "org/name"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found" and "`gpt-9`" in missing.value.message

    chat = client.chat.completions.create(model="org/name", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert chat.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "error", "code"),
    [
        ({"model": "gpt-9"}, openai.NotFoundError, "model_not_found"),
        ({"model": ""}, openai.BadRequestError, "invalid_request"),
        (
            {"model": "qwen2", "messages": [{"role": "user", "content": "x" * 5000}]},
            openai.APIStatusError,
            "request_too_large",
        ),
        # A disabled model's 503 does not go away on retry: x-should-retry: false stops the SDK's retries.
        ({"model": "off"}, openai.InternalServerError, "model_disabled"),
    ],
)
def test_openai_sdk_does_not_retry_what_a_retry_cannot_cure(
    stack: Any, kwargs: dict[str, Any], error: type[openai.APIStatusError], code: str
) -> None:
    client = sdk(stack, max_retries=3)
    before = requests_seen(stack)
    with pytest.raises(error) as raised:
        client.chat.completions.create(**{"messages": MESSAGES, "max_tokens": 2, **kwargs})
    assert raised.value.code == code, raised.value
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert requests_seen(stack) - before == 1


def test_openai_sdk_retries_an_unavailable_model_after_retry_after(stack: Any) -> None:
    client = sdk(stack, max_retries=2)
    before = requests_seen(stack)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="empty", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert raised.value.status_code == 503 and raised.value.code == "model_unavailable"
    assert raised.value.response.headers["retry-after"] == "1"
    assert "x-should-retry" not in raised.value.response.headers
    assert requests_seen(stack) - before == 3  # the first try and max_retries more


def test_openai_sdk_async(stack: Any) -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=f"{stack.envoys[0].url}/v1", api_key="unused", timeout=30)
        chats = await asyncio.gather(
            *(
                client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
                for name in ("qwen2", "llama3", "org/name") * 4
            )
        )
        assert all(c.choices[0].message.content and c.usage and c.usage.completion_tokens == 3 for c in chats)
        stream = await client.chat.completions.create(
            model="qwen2",
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        completion = await client.completions.create(model="llama3", prompt="x", max_tokens=2)
        assert completion.usage and completion.usage.completion_tokens == 2
        assert [m.id async for m in client.models.list()][:2] == ["qwen2", "llama3"]
        assert (await client.models.retrieve("org/name")).id == "org/name"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("org/other")
        with pytest.raises(openai.InternalServerError) as raised:
            await client.with_options(max_retries=0).chat.completions.create(
                model="empty",
                messages=MESSAGES,  # type: ignore[arg-type]
            )
        assert raised.value.code == "model_unavailable"
        await client.close()

    asyncio.run(main())


def test_tgi_native_api_by_path_prefix(stack: Any) -> None:
    url = stack.envoys[0].url
    req = {"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 3}}
    with httpx.Client(timeout=30) as client:
        generated = client.post(f"{url}/models/qwen2/generate", json=req)
        assert generated.status_code == 200, generated.text
        assert generated.headers["x-served-by-endpoint"] == "qwen2-0"
        assert len(generated.json()["generated_text"].split()) == 3
        # TGI's root: a list of one answer (the same generation: the simulator is deterministic per input).
        for path in ("/models/qwen/", "/models/qwen"):
            root = client.post(f"{url}{path}", json=req)
            assert root.status_code == 200, (path, root.text)
            assert root.json() == [generated.json()]
        header = client.post(f"{url}/", json=req, headers={"x-model-id": "qwen2"})
        assert header.json() == [generated.json()]
        streamed = client.post(f"{url}/models/qwen2/generate_stream", json=req)
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1]["generated_text"] == generated.json()["generated_text"]
        # The OpenAI paths work after the prefix too (InferenceClient's chat_completion with that base_url).
        chat = client.post(
            f"{url}/models/org/name/v1/chat/completions",
            json={"model": "org/name", "messages": MESSAGES, "max_tokens": 2},
        )
        assert chat.status_code == 200 and chat.headers["x-served-by-endpoint"] == "org-name-0"

        missing = client.post(f"{url}/", json=req)
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "invalid_request"
        unknown = client.post(f"{url}/models/gpt-9/generate", json=req)
        assert unknown.status_code == 404 and "`gpt-9`" in unknown.json()["error"]["message"]
        # Only inference paths after the prefix: an engine's admin path stays out of reach, however asked.
        for path in (
            "/models/qwen2/metrics",
            "/models/qwen2/info",
            "/models/qwen2/../../metrics",
            "/models/qwen2%2F..%2F..%2Fmetrics",
            "/v1/models%2F..%2F..%2Fmetrics",
            "/v1/chat/completions%5C..%5C..%5Cmetrics",
        ):
            response = client.post(f"{url}{path}", json=req)
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"]["code"] in ("not_found", "model_not_found")
        # A `model` in the body wins over the path (as over the header); the engine is then sent its root
        # (`/models/qwen2/metrics` names a model `qwen2/metrics`, with no inference path after it).
        response = client.post(f"{url}/models/qwen2/metrics", json={"model": "qwen2", **req})
        assert response.headers["content-type"].startswith("application/json"), response.text
        assert "tgi_" not in response.text
        assert client.get(f"{url}/models/qwen2/generate").status_code == 405


def test_huggingface_inference_client_text_generation(stack: Any) -> None:
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    client = InferenceClient(base_url=f"{stack.envoys[0].url}/models/qwen2", timeout=30)
    text = client.text_generation("What is Deep Learning?", max_new_tokens=4)
    assert isinstance(text, str) and len(text.split()) == 4
    details = client.text_generation("What is Deep Learning?", max_new_tokens=4, details=True)
    assert details.generated_text == text and details.details and details.details.generated_tokens == 4
    tokens = list(client.text_generation("What is Deep Learning?", max_new_tokens=4, stream=True))
    assert "".join(tokens) == text
    with pytest.raises(HfHubHTTPError, match="gpt-9"):
        InferenceClient(base_url=f"{stack.envoys[0].url}/models/gpt-9").text_generation("x", max_new_tokens=1)


def test_tgi_text_generation_client(stack: Any) -> None:
    """TGI's own `text_generation.Client`, unchanged. Not in the dev extras: it pins huggingface_hub < 1,
    which conflicts with the hub client above; `make install` puts it beside (`pip install --no-deps`)."""
    import text_generation

    client = text_generation.Client(f"{stack.envoys[0].url}/models/qwen2", timeout=30)
    response = client.generate("What is Deep Learning?", max_new_tokens=4)
    assert response.details.generated_tokens == 4 and len(response.generated_text.split()) == 4
    streamed = [r for r in client.generate_stream("What is Deep Learning?", max_new_tokens=4)]
    assert "".join(r.token.text for r in streamed) == response.generated_text
    assert streamed[-1].generated_text == response.generated_text

    async def main() -> None:
        aclient = text_generation.AsyncClient(f"{stack.envoys[0].url}/models/qwen", timeout=30)
        assert (await aclient.generate("What is Deep Learning?", max_new_tokens=4)) == response

    asyncio.run(main())
