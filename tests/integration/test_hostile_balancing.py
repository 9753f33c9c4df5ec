"""The prefix-affinity key filter and the shedding filter tried as a hostile client would, through a real
Envoy and control plane: malformed, huge or odd bodies and headers get the normal answer or the gateway's
OpenAI-style 4xx, never a 5xx, and no Lua filter ever errors (Envoy's `lua.errors` counters and its log)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from control_plane.xds.builders.prefix_affinity import KEY_HEADER
from tests.integration.conftest import StackFactory
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def lua_errors(admin_url: str) -> dict[str, int]:
    """Every Lua filter error counter Envoy has (all must stay 0)."""
    text = httpx.get(f"{admin_url}/stats", params={"filter": r"lua.*errors"}, timeout=10).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.endswith("errors") and value.strip().isdigit():
            out[name] = int(value)
    return out


def lua_log_lines(stack: Any) -> list[str]:
    """Lines of Envoy's own log that report a Lua script failing."""
    text = "\n".join(envoy.process.log_text() for envoy in stack.envoys)
    return [line for line in text.splitlines() if "script log" in line or "lua" in line.lower()]


def assert_gateway_answer(response: httpx.Response, what: str) -> None:
    """A normal answer, or a 4xx in OpenAI's error shape: never a 5xx."""
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    if response.status_code >= 400:
        doc = response.json()
        # The gateway's own errors are OpenAI's shape; an engine's 400 is passed on in its own (vLLM's
        # `{"object": "error", "message": ...}`, TGI's `{"error": ...}`): both name the problem.
        message = (
            doc["error"]["message"]
            if isinstance(doc.get("error"), dict)
            else doc.get("message") or doc.get("error")
        )
        assert isinstance(message, str) and message, (what, response.text[:300])


@pytest.fixture
def stack(make_stack: StackFactory) -> Any:
    doc = registry(
        model("chat", "vllm", [free_port(), free_port()], load_balancing="prefix_affinity"),
        model("tgi", "tgi", [free_port()], load_balancing="prefix_affinity"),
    )
    return make_stack(doc)


def _hostile_bodies() -> list[tuple[str, bytes]]:
    messages = [{"role": "user", "content": "hello"}]
    ok = {"model": "chat", "messages": messages, "max_tokens": 2}
    big_history = [{"role": "user", "content": "x" * 1000}] * 4000  # about 4 MiB
    return [
        (
            "invalid utf-8 in content",
            b'{"model":"chat","messages":[{"role":"user","content":"\xff\xfe\xc3("}]}',
        ),
        (
            "invalid utf-8 in user",
            b'{"model":"chat","user":"\xff\xff","messages":[{"role":"user","content":"a"}]}',
        ),
        ("messages not an array", json.dumps({"model": "chat", "messages": "hello"}).encode()),
        ("messages an object", json.dumps({"model": "chat", "messages": {"role": "user"}}).encode()),
        ("messages null", json.dumps({"model": "chat", "messages": None}).encode()),
        ("user a number", json.dumps({**ok, "user": 123}).encode()),
        ("user an object", json.dumps({**ok, "user": {"id": "x"}}).encode()),
        ("user empty", json.dumps({**ok, "user": ""}).encode()),
        ("unterminated user", b'{"model":"chat","messages":[{"role":"user","content":"a"}],"user":"abc'),
        ("unterminated content", b'{"model":"chat","messages":[{"role":"user","content":"abc'),
        ("unterminated messages", b'{"model":"chat","messages":['),
        ("truncated after role", b'{"model":"chat","messages":[{"role":"user"'),
        ("content last byte", b'{"model":"chat","messages":[{"role":"user","content":'),
        (
            "backslash storm",
            b'{"model":"chat","messages":[{"role":"user","content":"' + b"\\" * 9000 + b'"}]}',
        ),
        ("quote storm", b'{"model":"chat","user":"' + b'\\"' * 6000 + b'","messages":[]}'),
        (
            "content list no text",
            json.dumps({**ok, "messages": [{"role": "user", "content": [{"x": 1}]}]}).encode(),
        ),
        ("content a number", json.dumps({**ok, "messages": [{"role": "user", "content": 5}]}).encode()),
        ("prompt a number", json.dumps({"model": "chat", "prompt": 7}).encode()),
        ("nul bytes", b'{"model":"chat","messages":[{"role":"user","content":"a\x00b"}]}\x00\x00'),
        ("just the model", b'{"model":"chat"}'),
        (
            "whitespace padded",
            b'{"model":"chat"' + b" " * 20000 + b',"messages":[{"role":"user","content":"a"}]}',
        ),
        ("a 4 MiB history", json.dumps({"model": "chat", "messages": big_history}).encode()),
    ]


def test_hostile_bodies_and_headers_never_break_the_key_filter(stack: Any) -> None:
    envoy = stack.envoys[0]
    with httpx.Client(base_url=envoy.url, timeout=30) as client:
        normal = client.post(CHAT, json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert normal.status_code == 200, normal.text
        for what, body in _hostile_bodies():
            assert_gateway_answer(client.post(CHAT, content=body, headers=JSON), what)
            # The same bodies on the completions path and on TGI's own API.
            assert_gateway_answer(client.post("/v1/completions", content=body, headers=JSON), what)
        # Just under the 4 MiB body limit (the filter reads it), and over it (Envoy's 413 first).
        history = [{"role": "user", "content": "x" * 1000}] * 3900
        near = client.post(CHAT, json={"model": "chat", "messages": history, "max_tokens": 1})
        assert_gateway_answer(near, "just under the body limit")
        assert near.status_code != 413, near.text[:200]
        over = client.post(CHAT, json={"model": "chat", "messages": history * 2})
        assert over.status_code == 413 and over.json()["error"]["message"], over.text[:200]
        tgi_bodies = [b'{"inputs": 5}', b'{"inputs": "abc', b'{"inputs": [1, 2', b'{"inputs": "\xff\xfe"}']
        for body in tgi_bodies:
            answer = client.post("/generate", content=body, headers={**JSON, "x-model-id": "tgi"})
            assert_gateway_answer(answer, body.decode(errors="replace"))

        # Hostile headers: a 7 KB session id, a client's own prefix key, odd session ids.
        hostile_headers: list[dict[str, str | bytes]] = [
            {"x-session-id": "s" * 7000},  # (the header limit is 8 KiB)
            {"x-session-id": "a\tb"},
            {"x-session-id": "é".encode()},  # bytes over 0x7f
            {KEY_HEADER: "attacker-chosen"},
            {KEY_HEADER: "x" * 7000, "x-session-id": "abc"},
        ]
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in hostile_headers:
            answer = client.post(CHAT, json=body, headers=headers)
            assert answer.status_code == 200, (list(headers), answer.status_code, answer.text[:200])
        # Duplicated session ids (two header lines) and two prefix keys.
        raw = [("x-session-id", "a"), ("x-session-id", "b"), (KEY_HEADER, "1"), (KEY_HEADER, "2")]
        answer = client.post(CHAT, json=body, headers=raw)
        assert answer.status_code == 200, answer.text

        # A client's own key header never decides placement: many requests with the same client key but
        # different conversations spread over both replicas.
        served = set()
        for index in range(24):
            conv = {
                "model": "chat",
                "messages": [{"role": "user", "content": f"topic {index}"}],
                "max_tokens": 2,
            }
            answer = client.post(CHAT, json=conv, headers={KEY_HEADER: "pinned"})
            assert answer.status_code == 200, answer.text
            served.add(answer.headers["x-served-by-endpoint"])
        assert served == {"chat-0", "chat-1"}, served

    assert_no_lua_errors(stack)


def assert_no_lua_errors(stack: Any) -> None:
    for envoy in stack.envoys:
        errors = lua_errors(envoy.admin_url)
        assert errors, "Envoy reports no Lua error counter: the check would be vacuous"
        assert not any(errors.values()), errors
    assert not lua_log_lines(stack), lua_log_lines(stack)[:5]
