"""SSE answers stream through Envoy chunk by chunk; streams are bounded by idle timeouts, not a 15 s cap."""

from __future__ import annotations

import itertools
import json
import socket
import time
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration


def stream_events(
    client: httpx.Client, url: str, body: dict[str, Any]
) -> tuple[int, list[tuple[float, str]], str]:
    """POST a streaming request; return status, (arrival time, data) per SSE event, and any non-SSE body."""
    events: list[tuple[float, str]] = []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response.status_code, events, response.read().decode()
        try:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), line.removeprefix("data: ")))
        except httpx.RemoteProtocolError:
            events.append((time.monotonic(), "<cut>"))
    return response.status_code, events, ""


def chat_body(model_id: str, tokens: int) -> dict[str, Any]:
    return {
        "model": model_id,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_stream_arrives_in_chunks_spread_over_time(make_stack: StackFactory) -> None:
    port = free_port()
    stack = make_stack(
        registry(model("qwen2", "tgi", [port])), sim_extra_args={"qwen2-0": ["--decode-ms-per-token", "60"]}
    )
    with httpx.Client(timeout=30) as client:
        status, events, _ = stream_events(client, stack.envoys[0].url, chat_body("qwen2", 10))
    assert status == 200
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(text.split()) == 10
    assert chunks[-1]["usage"]["completion_tokens"] == 10  # the include_usage chunk passes through
    times = [t for t, _ in events]
    # Ten tokens at 60 ms each: spread over about half a second, not delivered in one piece at the end.
    assert times[-1] - times[0] > 0.4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(1 for g in gaps if g > 0.03) >= 7, gaps


def test_long_stream_outlives_the_idle_timeout_and_a_hung_one_is_cut(make_stack: StackFactory) -> None:
    ports = [free_port(), free_port()]
    stack = make_stack(
        registry(
            model("long", "vllm", [ports[0]], limits={"request_timeout_s": 0, "idle_timeout_s": 1}),
            model("capped", "vllm", [ports[1]], limits={"request_timeout_s": 1.5, "idle_timeout_s": 1}),
        ),
        sim_extra_args={
            "long-0": ["--decode-ms-per-token", "100"],
            "capped-0": ["--decode-ms-per-token", "100"],
        },
    )
    url = stack.envoys[0].url
    with httpx.Client(timeout=30) as client:
        started = time.monotonic()
        status, events, _ = stream_events(client, url, chat_body("long", 30))
        assert status == 200 and events[-1][1] == "[DONE]"
        assert time.monotonic() - started > 2.5  # three seconds of tokens, well past the 1 s idle timeout

        # A whole-request timeout, when configured, does cut a stream: the client sees it end early.
        status, events, _ = stream_events(client, url, chat_body("capped", 30))
        assert status == 200 and events[-1][1] == "<cut>" and len(events) < 30

        # A backend that accepts and never answers is cut by the idle timeout with a JSON 504.
        client.post(f"http://127.0.0.1:{ports[0]}/sim/control", json={"hang": True}).raise_for_status()
        started = time.monotonic()
        response = client.post(
            f"{url}/v1/chat/completions",
            json={"model": "long", "messages": [{"role": "user", "content": "x"}]},
        )
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert 0.9 < time.monotonic() - started < 10


def test_request_timeout_cuts_a_slow_body_but_never_a_long_stream(make_stack: StackFactory) -> None:
    """The gateway's request timeout bounds receiving the request only: a body that never finishes is cut
    with 408 in seconds, while a generation streaming for six times that limit goes on to its end."""
    port = free_port()
    stack = make_stack(
        registry(model("qwen2", "tgi", [port]), request_receive_timeout_s=2),
        sim_extra_args={"qwen2-0": ["--decode-ms-per-token", "500"]},
    )
    url = stack.envoys[0].url
    # A client that sends half its body and stops: answered 408 while it still waits to send the rest.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.envoys[0].listen_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"model": "qwen2", '
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 15  # a 2 s limit, with room for a loaded machine

    with httpx.Client(timeout=httpx.Timeout(10, read=30)) as client:
        started = time.monotonic()
        status, events, _ = stream_events(client, url, chat_body("qwen2", 24))
        assert status == 200 and events[-1][1] == "[DONE]", events[-3:]
        assert time.monotonic() - started >= 11.5  # 24 tokens at 500 ms: 12 s of streaming, not cut
