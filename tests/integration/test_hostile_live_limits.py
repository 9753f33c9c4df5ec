"""The keys' live state with a failing control plane and hostile timing, through real Envoys and the real
control plane: a key revoked while at its concurrency limit answers 401 at once (not 429), its streams in
flight end normally and nothing of it stays in the live table; a control plane restarted while a key's
streams hold its limit leaves no count stuck (the key is admitted again once they end)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.integration.test_hostile_balancing import assert_no_lua_errors
from tests.integration.test_live_limits import CHAT, create_key
from tests.integration.test_live_limits import stack as stack  # the fixture, shared
from tests.support.gateway import admin_client, eventually

pytestmark = pytest.mark.integration


def _post(url: str, key: str, **extra: Any) -> httpx.Response:
    body = {"model": "qwen2", **CHAT, **extra}
    return httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def _code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"]) if response.status_code >= 400 else "ok"


@contextmanager
def long_streams(url: str, key: str, count: int, tokens: int) -> Iterator[list[tuple[int, bool]]]:
    """`count` llama3 streams of `tokens` tokens (20 ms each) in flight; (status, ended with [DONE])."""
    outcomes: list[tuple[int, bool]] = []
    started = threading.Barrier(count + 1, timeout=30)
    body = {
        "model": "llama3",
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "x"}],
    }

    def one() -> None:
        status, done = 0, False
        try:
            with httpx.stream(
                "POST",
                f"{url}/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
                timeout=60,
            ) as r:
                status = r.status_code
                started.wait()
                done = any(line == "data: [DONE]" for line in r.iter_lines())
        except (httpx.HTTPError, threading.BrokenBarrierError):
            pass
        outcomes.append((status, done))

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    started.wait()
    try:
        yield outcomes
    finally:
        for thread in threads:
            thread.join(timeout=90)


def test_a_key_revoked_at_its_concurrency_limit(stack: Any) -> None:
    envoy = stack.envoys[0]
    key = create_key(stack, name="revoked-while-full", max_concurrent=3, rpm_limit=10_000)

    def live_source() -> str:
        dump = httpx.get(f"{envoy.admin_url}/config_dump", params={"resource": "ecds_filters"}, timeout=10)
        return str(dump.text)

    with long_streams(envoy.url, key["key"], count=12, tokens=300) as outcomes:  # 6 s each
        eventually(
            lambda: _code(_post(envoy.url, key["key"])) == "rate_limit_exceeded", 15, "the key blocked"
        )
        with admin_client(stack) as admin:
            assert admin.delete(f"/admin/keys/{key['id']}").status_code == 200
        # Revocation wins over the concurrency block, at once and on every later request.
        eventually(lambda: _code(_post(envoy.url, key["key"])) == "invalid_api_key", 5, "401 after revoke")
        for _ in range(5):
            assert _code(_post(envoy.url, key["key"])) == "invalid_api_key"
        eventually(lambda: key["id"] not in live_source(), 10, "the revoked key gone from the live table")
        assert len(outcomes) < 12, "the streams ended before the revocation: the test proves nothing"
    # The streams admitted before the revocation were not cut.
    assert len(outcomes) == 12 and all(o == (200, True) for o in outcomes), outcomes
    # Its later periodic and end entries never bring it back.
    other = create_key(stack, name="after", max_concurrent=3)
    assert _code(_post(envoy.url, other["key"])) == "ok"
    assert key["id"] not in live_source()
    assert_no_lua_errors(stack)


def test_a_control_plane_restart_leaves_no_count_stuck(stack: Any) -> None:
    envoy = stack.envoys[0]
    key = create_key(stack, name="restart", max_concurrent=4)
    with long_streams(envoy.url, key["key"], count=4, tokens=400) as outcomes:  # 8 s each
        eventually(
            lambda: _code(_post(envoy.url, key["key"])) == "rate_limit_exceeded", 15, "the key blocked"
        )
        stack.stop_control_plane()
        # Envoy keeps serving on its last config while the control plane is away.
        assert _code(_post(envoy.url, key["key"])) == "rate_limit_exceeded"
        stack.start_control_plane()
        assert len(outcomes) < 4, "the streams ended before the restart: the test proves nothing"
    assert all(o == (200, True) for o in outcomes), outcomes
    # The restarted control plane counts the streams that ended (or that it never saw) as gone.
    eventually(lambda: _code(_post(envoy.url, key["key"])) == "ok", 15, "the key admitted again")
    # And it still enforces: four new streams block the key again.
    with long_streams(envoy.url, key["key"], count=4, tokens=200):
        eventually(lambda: _code(_post(envoy.url, key["key"])) == "rate_limit_exceeded", 15, "blocked again")
    eventually(lambda: _code(_post(envoy.url, key["key"])) == "ok", 15, "admitted again after")
    assert_no_lua_errors(stack)
