"""The prefix-affinity key, computed by the Lua filter inside a real Envoy and seen by the model server (an
echo server that answers with the headers it received)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from control_plane.xds.builders.prefix_affinity import KEY_HEADER
from tests.integration.conftest import StackFactory
from tests.support.echo import EchoServer
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 4}


@pytest.fixture
def plain() -> Iterator[EchoServer]:
    with EchoServer("plain", free_port()).running() as server:
        yield server


@pytest.fixture
def gateway(make_stack: StackFactory, echo: EchoServer, plain: EchoServer) -> Iterator[httpx.Client]:
    doc = registry(
        model("echo", "vllm", [echo.port], load_balancing="prefix_affinity"),
        model("plain", "vllm", [plain.port]),
    )
    stack = make_stack(doc, start=False)  # no simulator: the echo servers are the model servers
    stack.start_control_plane()
    stack.start_envoy()
    with httpx.Client(base_url=stack.envoys[0].url, timeout=10) as client:
        yield client


def key_of(
    client: httpx.Client, body: dict[str, Any] | bytes, path: str = "/v1/chat/completions", **headers: str
) -> str | None:
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json", **headers})
    else:
        response = client.post(path, json={"model": "echo", **body}, headers=headers)
    assert response.status_code == 200, response.text
    forwarded = {k.lower(): v for k, v in response.json()["headers"].items()}
    return forwarded.get(KEY_HEADER)


def conversation(first_user: str, turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": first_user}]
    for turn in range(1, turns):
        messages += [
            {"role": "assistant", "content": f"Answer {turn}: " + "words " * 40},
            {"role": "user", "content": f'Follow-up {turn} with "quotes" and \\ backslashes'},
        ]
    return messages


def test_every_turn_of_a_conversation_has_the_key_of_its_first_turn(gateway: httpx.Client) -> None:
    first = key_of(gateway, {"messages": conversation("Plan a trip to Lisbon", 1)})
    assert first is not None and first.startswith("c:")
    for turns in (2, 5, 60):  # 60 turns: a history far beyond the searched window
        assert key_of(gateway, {"messages": conversation("Plan a trip to Lisbon", turns)}) == first
    # Same system prompt, another first question: another key.
    assert key_of(gateway, {"messages": conversation("Plan a trip to Porto", 1)}) != first
    # Escaped quotes inside the first user message are part of its content, not its end.
    tricky = conversation('say "hi", then {"role": "user"}', 1)
    assert key_of(gateway, {"messages": tricky}) == key_of(gateway, {"messages": tricky + tricky[1:]})
    assert key_of(gateway, {"messages": tricky}) != key_of(gateway, {"messages": conversation("say ", 1)})


def test_content_before_role_and_content_parts_keep_turns_together(gateway: httpx.Client) -> None:
    def raw(messages: list[str]) -> bytes:
        return ('{"model":"echo","messages":[' + ",".join(messages) + "]}").encode()

    user = '{"content": "Hello there", "role": "user"}'
    reply = '{"content": "Hi", "role": "assistant"}'
    assert key_of(gateway, raw([user])) == key_of(gateway, raw([user, reply, user]))
    parts = {"role": "user", "content": [{"type": "text", "text": "Describe this"}]}
    one = key_of(gateway, {"messages": [parts]})
    assert one is not None
    assert one == key_of(gateway, {"messages": [parts, {"role": "assistant", "content": "A cat"}, parts]})


def test_user_field_and_session_header_are_explicit_hints(gateway: httpx.Client) -> None:
    a = key_of(gateway, {"messages": conversation("one", 1), "user": "alice"})
    b = key_of(gateway, {"messages": conversation("two", 3), "user": "alice"})
    assert a == b and a is not None and a.startswith("u:")
    # At the end of a long body (SDKs write `user` after `messages`) it is still found.
    assert key_of(gateway, {"messages": conversation("three", 60), "user": "alice"}) == a
    assert key_of(gateway, {"messages": conversation("one", 1), "user": "bob"}) != a
    s1 = key_of(gateway, {"messages": conversation("one", 1), "user": "alice"}, **{"x-session-id": "sess-1"})
    s2 = key_of(gateway, {"messages": conversation("two", 1)}, **{"x-session-id": "sess-1"})
    assert s1 == s2 and s1 is not None and s1.startswith("s:")


def test_completion_prompts_key_on_their_first_bytes(gateway: httpx.Client) -> None:
    shared = "Few-shot examples: " + "example " * 60  # longer than the bytes that make the key
    a = key_of(gateway, {"prompt": shared + "question A"}, path="/v1/completions")
    b = key_of(gateway, {"prompt": shared + "question B"}, path="/v1/completions")
    c = key_of(gateway, {"prompt": "Another prompt entirely"}, path="/v1/completions")
    assert a == b and a is not None and a.startswith("p:") and c != a


def test_a_client_cannot_set_the_key_and_no_prefix_means_no_key(gateway: httpx.Client) -> None:
    body = {"messages": conversation("x", 1)}
    assert key_of(gateway, body, **{KEY_HEADER: "forged"}) == key_of(gateway, body)
    # Nothing to key on: the header is dropped (Maglev picks at random under its load bound).
    assert key_of(gateway, {"input": "no messages here"}, **{KEY_HEADER: "forged"}) is None
    assert key_of(gateway, json.dumps({"model": "echo", "messages": []}).encode()) is None


def test_models_without_the_policy_never_run_the_filter(gateway: httpx.Client) -> None:
    response = gateway.post(
        "/v1/chat/completions",
        json={"model": "plain", "messages": conversation("x", 1)},
        headers={KEY_HEADER: "kept"},
    )
    assert response.status_code == 200, response.text
    forwarded = {k.lower(): v for k, v in response.json()["headers"].items()}
    assert forwarded.get(KEY_HEADER) == "kept"  # untouched: the Lua filter was not entered
