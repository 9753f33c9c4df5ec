"""The gateway's edge: only the methods each API uses, slow or unfinished requests cut with 408, no internal
header reaching the model servers, a client's request id kept only when it is fit."""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.integration.conftest import StackFactory
from tests.support.echo import EchoServer
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

BODY = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture
def stack(make_stack: StackFactory, echo: EchoServer) -> Any:
    doc = registry(
        model("echo", "vllm", [echo.port]),
        request_receive_timeout_s=2,
        request_headers_timeout_s=2,
    )
    stack = make_stack(doc, start=False)  # no simulator: the echo server is the model server
    stack.start_control_plane()
    stack.start_envoy()
    return stack


def assert_405(response: httpx.Response, allow: str) -> None:
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allow
    assert response.headers["x-gateway-error-code"] == "method_not_allowed"
    if response.request.method != "HEAD":
        assert response.json()["error"]["code"] == "method_not_allowed"
        assert response.json()["error"]["type"] == "invalid_request_error"


def raw_exchange(port: int, data: bytes, timeout_s: float = 20) -> tuple[bytes, float]:
    """Send raw bytes, return what comes back before the server closes (or the timeout) and how long."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and b'"error"' in received and received.rstrip().endswith(b"}"):
                    break
        except TimeoutError:
            pass
    return received, time.monotonic() - started


def test_inference_paths_take_post_only_and_nothing_else_reaches_the_model_server(
    stack: Any, echo: EchoServer
) -> None:
    url = stack.envoys[0].url
    methods = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate", "/rerank"]
    with httpx.Client(timeout=10) as client:

        def call(method_path: tuple[str, str]) -> httpx.Response:
            method, path = method_path
            return client.request(method, f"{url}{path}", json=BODY if method != "HEAD" else None)

        # Tens in flight at once, as clients would send them.
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(call, [(m, p) for m in methods for p in paths for _ in range(2)]))
        for response in answers:
            assert_405(response, "POST")
        assert echo.forwarded() == []  # not one of them reached the model server
        ok = client.post(f"{url}/v1/chat/completions", json=BODY)
        assert ok.status_code == 200 and ok.json()["method"] == "POST"
        assert len(echo.forwarded()) == 1


def test_read_only_paths_take_get_only(stack: Any) -> None:
    url = stack.envoys[0].url
    with httpx.Client(timeout=10) as client:
        for method, path in (
            ("POST", "/v1/models"),
            ("DELETE", "/v1/models/echo"),
            ("PUT", "/v1/models/echo"),
            ("POST", "/v1/models/unknown"),
            ("POST", "/health"),
            ("OPTIONS", "/health"),
        ):
            assert_405(client.request(method, f"{url}{path}", json={}), "GET")
        assert client.get(f"{url}/v1/models").json()["data"][0]["id"] == "echo"
        assert client.get(f"{url}/v1/models/echo").json()["id"] == "echo"
        assert client.get(f"{url}/health").status_code == 200


def test_connect_is_refused_at_once(stack: Any) -> None:
    port = stack.envoys[0].listen_port
    answer, elapsed = raw_exchange(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405"), answer
    assert b"allow: get, post" in head.lower()
    assert b'"code":"method_not_allowed"' in body
    assert elapsed < 10  # it used to hang for the 300 s stream idle timeout


def test_unfinished_body_and_headers_are_cut_with_408(stack: Any, echo: EchoServer) -> None:
    port = stack.envoys[0].listen_port
    partial_body = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
        b'content-length: 200\r\n\r\n{"model": "echo", "mess'
    )
    partial_headers = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\ncontent-type: appl"
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda data: raw_exchange(port, data), [partial_body, partial_headers] * 10))
    for answer, elapsed in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code":"request_timeout"' in answer
        assert elapsed < 15  # a 2 s limit, with room for a loaded machine
    assert echo.forwarded() == []


def test_internal_headers_never_reach_the_model_server(stack: Any, echo: EchoServer) -> None:
    spoofed = {
        "x-envoy-attempt-count": "7",
        "x-envoy-original-dst-host": "10.0.0.1:80",
        "x-envoy-retry-on": "5xx",
        "x-envoy-upstream-rq-timeout-ms": "1",
        "x-envoy-internal": "true",
        "x-envoy-force-trace": "1",
    }
    with httpx.Client(timeout=10) as client:
        response = client.post(f"{stack.envoys[0].url}/v1/chat/completions", json=BODY, headers=spoofed)
    assert response.status_code == 200, response.text
    forwarded = {k.lower() for k in response.json()["headers"]}
    assert not {h for h in forwarded if h.startswith("x-envoy-")}, forwarded
    assert not {h for h in response.headers if h.lower().startswith("x-envoy-")}, response.headers
    assert "x-gateway-model" in forwarded  # the gateway's own header still goes


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("trace-abc_1.2:3", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("x" * 7_000, False),  # (a header block over 8 KiB gets 431: test_errors.py)
        ("has space", False),
        ("semi;colon", False),
        ("<script>", False),
    ],
)
def test_request_id_is_kept_only_when_short_and_plain(
    stack: Any, echo: EchoServer, sent: str, kept: bool
) -> None:
    with httpx.Client(timeout=10) as client:
        response = client.post(
            f"{stack.envoys[0].url}/v1/chat/completions", json=BODY, headers={"x-request-id": sent}
        )
    assert response.status_code == 200, response.text
    echoed = response.headers["x-request-id"]
    upstream = {k.lower(): v for k, v in response.json()["headers"].items()}["x-request-id"]
    assert echoed == upstream  # the client and the engine see the same id
    if kept:
        assert echoed == sent
    else:
        assert echoed != sent and re.fullmatch(r"[0-9a-f-]{36}", echoed), echoed
