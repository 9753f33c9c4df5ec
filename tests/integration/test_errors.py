"""Bad requests get OpenAI-style JSON errors with the right status, made by Envoy itself."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.conftest import StackFactory
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(make_stack: StackFactory) -> Any:
    from control_plane.devstack.procs import free_port

    return make_stack(
        registry(
            model("qwen2", "tgi", [free_port()]),
            model("off", "vllm", [free_port()], enabled=False),
            model("empty", "vllm", []),
            max_request_body_bytes=4096,
        )
    )


def assert_error(response: httpx.Response, status: int, code: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code, error
    assert fragment in error["message"], error


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "fragment"),
    [
        (
            {"json": {"model": "gpt-9", "messages": []}},
            404,
            "model_not_found",
            "The model `gpt-9` does not exist",
        ),
        ({"json": {"messages": []}}, 400, "invalid_request", "You must provide a model parameter"),
        ({"json": {"model": 42}}, 400, "invalid_request", "`model` must be a non-empty string"),
        ({"json": {"model": ""}}, 400, "invalid_request", "`model` must be a non-empty string"),
        ({"json": {"model": ["qwen2"]}}, 400, "invalid_request", "as a non-empty string"),
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "invalid_request",
            "could not parse the JSON body",
        ),
        (
            {"content": b"x" * 5000, "headers": {"content-type": "application/json"}},
            413,
            "request_too_large",
            "limit of 4096 bytes",
        ),
        ({"json": {"model": "off", "messages": []}}, 503, "model_disabled", "The model `off` is disabled"),
        ({"json": {"model": "empty", "messages": []}}, 503, "model_unavailable", "No healthy endpoint"),
    ],
)
def test_error_replies(stack: Any, kwargs: dict[str, Any], status: int, code: str, fragment: str) -> None:
    with httpx.Client(timeout=10) as client:
        assert_error(
            client.post(f"{stack.envoys[0].url}/v1/chat/completions", **kwargs), status, code, fragment
        )


def test_oversized_headers_get_the_gateways_431(stack: Any) -> None:
    """Request headers over `max_request_headers_kb` (8 KiB): Envoy's 431 in the gateway's shape, never the
    engine's plain-text 400 for a long header line; a large header under the limit still goes through."""
    body = {"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{stack.envoys[0].url}/v1/chat/completions"
    with httpx.Client(timeout=10) as client:
        assert client.post(url, json=body, headers={"x-trace": "a" * 6000}).status_code == 200
        for size in (9000, 20_000, 70_000):
            reply = client.post(url, json=body, headers={"x-trace": "a" * size})
            assert_error(reply, 431, "request_headers_too_large", "limit of 8 KiB")
            assert reply.headers["x-should-retry"] == "false"


def test_unknown_paths_are_not_forwarded(stack: Any) -> None:
    with httpx.Client(timeout=10) as client:
        for path in (
            "/metrics",
            "/v1/../metrics",
            "/sim/control",
            "/v1/chat/completions/../../health_generate",
        ):
            response = client.post(f"{stack.envoys[0].url}{path}", json={"model": "qwen2", "crash": True})
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"]["code"] in ("not_found", "model_not_found")
        # The simulated backend is untouched (its /sim/control would have crashed it).
        ok = client.post(
            f"{stack.envoys[0].url}/v1/completions", json={"model": "qwen2", "prompt": "x", "max_tokens": 1}
        )
        assert ok.status_code == 200


def test_disabled_model_is_not_listed(stack: Any) -> None:
    with httpx.Client(timeout=10) as client:
        ids = [m["id"] for m in client.get(f"{stack.envoys[0].url}/v1/models").json()["data"]]
    assert ids == ["qwen2", "empty"]
