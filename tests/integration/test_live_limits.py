"""The keys' live state through real Envoys and the real control plane: OpenAI's remaining-limit headers on
every answer (streams included), the soft per-key concurrency limit, neither ever updating a listener, and
a revoked key leaving nothing behind."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, envoy_stat, eventually
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+s$")
LIVE_RELOADS = "extension_config_discovery.http_filter.gateway.key_live.config_reload"


@pytest.fixture
def stack(make_stack: StackFactory) -> Any:
    doc = registry(model("qwen2", "tgi", [free_port()]), model("llama3", "vllm", [free_port()]))
    doc["auth"] = {"mode": "api_key"}
    # llama3 streams a token every 20 ms: long requests for the concurrency limit.
    return make_stack(doc, sim_extra_args={"llama3-0": ["--decode-ms-per-token", "20"]})


def create_key(stack: Any, **settings: Any) -> dict[str, Any]:
    with admin_client(stack) as admin:
        response = admin.post("/admin/keys", json=settings)
    assert response.status_code == 201, response.text
    return response.json()


def listener_changes(admin_url: str) -> tuple[int, int]:
    with httpx.Client(timeout=10) as probe:
        return (
            envoy_stat(probe, admin_url, "listener_manager.listener_modified"),
            envoy_stat(probe, admin_url, "listener_manager.total_filter_chains_draining"),
        )


def stream_arrivals(
    url: str, api_key: str, streams: int, per_second: float, tokens: int
) -> tuple[list[tuple[float, float]], list[httpx.Response]]:
    """`streams` streams of `tokens` tokens from llama3 (20 ms each) for one key, arriving `per_second`:
    the (start, end) of every admitted one, read to its [DONE], and the refused answers."""
    headers = {"authorization": f"Bearer {api_key}"}
    body = {
        "model": "llama3",
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "x"}],
    }
    admitted: list[tuple[float, float]] = []
    refused: list[httpx.Response] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.3

    def one(index: int) -> None:
        time.sleep(max(0.0, start + index / per_second - time.monotonic()))
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            began = time.monotonic()
            if r.status_code != 200:
                r.read()
                with lock:
                    refused.append(r)
                return
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
        with lock:
            admitted.append((began, time.monotonic()))

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, range(streams)))
    return admitted, refused


def test_remaining_limits_on_every_answer_through_the_openai_sdk(stack: Any) -> None:
    envoy = stack.envoys[0]
    before = listener_changes(envoy.admin_url)
    key = create_key(stack, name="team-a", rpm_limit=1000, tpm_limit=100_000)
    client = openai.OpenAI(base_url=f"{envoy.url}/v1", api_key=key["key"], max_retries=0)

    def headers() -> dict[str, str]:
        raw = client.chat.completions.with_raw_response.create(model="qwen2", **CHAT)  # type: ignore[call-overload]
        assert raw.parse().choices
        return {k: v for k, v in raw.headers.items() if k.startswith("x-ratelimit-")}

    first = headers()
    assert first["x-ratelimit-limit-requests"] == "1000" and first["x-ratelimit-limit-tokens"] == "100000"
    for kind in ("requests", "tokens"):
        assert int(first[f"x-ratelimit-remaining-{kind}"]) <= int(first[f"x-ratelimit-limit-{kind}"])
        assert DURATION.match(first[f"x-ratelimit-reset-{kind}"]), first
    for _ in range(10):
        headers()
    # An estimate a second or so old: the twelve requests and their tokens show up shortly.
    seen: dict[str, str] = {}

    def caught_up() -> bool:
        seen.update(headers())
        return int(seen["x-ratelimit-remaining-requests"]) <= 1000 - 12

    eventually(caught_up, 15, "the remaining requests to count this key's requests")
    assert int(seen["x-ratelimit-remaining-tokens"]) < 100_000
    assert seen["x-ratelimit-reset-requests"] != "0s" and seen["x-ratelimit-reset-tokens"] != "0s"
    # It keeps going down as requests are made.
    low = int(seen["x-ratelimit-remaining-requests"])
    for _ in range(5):
        headers()
    eventually(lambda: int(headers()["x-ratelimit-remaining-requests"]) < low, 15, "a lower remaining count")

    # Streams carry them too (the headers come before the first chunk).
    raw_stream = client.chat.completions.with_raw_response.create(  # type: ignore[call-overload]
        model="llama3", stream=True, **CHAT
    )
    assert int(raw_stream.headers["x-ratelimit-remaining-requests"]) < 1000
    assert DURATION.match(raw_stream.headers["x-ratelimit-reset-tokens"])
    assert [chunk for chunk in raw_stream.parse()]

    # A key without limits gets none of them.
    free = create_key(stack, name="free")
    answer = httpx.post(
        f"{envoy.url}/v1/chat/completions",
        json={"model": "qwen2", **CHAT},
        headers={"authorization": f"Bearer {free['key']}"},
        timeout=30,
    )
    assert answer.status_code == 200 and not [h for h in answer.headers if h.startswith("x-ratelimit-")]
    # The live table changed several times, never through the listener.
    with httpx.Client(timeout=10) as probe:
        assert envoy_stat(probe, envoy.admin_url, LIVE_RELOADS) >= 2
    assert listener_changes(envoy.admin_url) == before


def test_the_concurrency_limit_is_a_soft_one_with_a_bounded_overrun(stack: Any) -> None:
    """Thirty 8-second streams of one key arriving 4 per second (without a limit all thirty would be in
    flight at once) against max_concurrent 5: refusals start once the control plane has seen five in
    flight (about a second: the periodic log, its flush, one push), so the peak is bounded by the limit
    plus what arrives in that time; generous here (2.5 s of arrivals) for a loaded machine."""
    envoy = stack.envoys[0]
    before = listener_changes(envoy.admin_url)
    limit, streams, per_second, tokens = 5, 30, 4.0, 400  # 400 tokens at 20 ms each: 8 s
    key = create_key(stack, name="bounded", max_concurrent=limit)
    admitted, refused = stream_arrivals(envoy.url, key["key"], streams, per_second, tokens)
    events = sorted([(b, 1) for b, _ in admitted] + [(e, -1) for _, e in admitted])
    peak = running = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    slack = int(2.5 * per_second)
    print(f"admitted {len(admitted)}, refused {len(refused)}, in-flight peak {peak} (limit {limit})")
    assert refused, "no request was refused: the limit did nothing"
    assert peak <= limit + slack, (peak, limit + slack)
    for response in refused:
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "concurrent" in error["message"], error
        assert response.headers["retry-after"] == "1"
    # Once the streams are over, the key works again (its in-flight count went back down).
    client = openai.OpenAI(base_url=f"{envoy.url}/v1", api_key=key["key"], max_retries=0)

    def works() -> bool:
        try:
            return bool(client.chat.completions.create(model="qwen2", **CHAT).choices)  # type: ignore[call-overload]
        except openai.RateLimitError:
            return False

    eventually(works, 10, "the key to be admitted again")
    assert listener_changes(envoy.admin_url) == before


def test_a_revoked_key_leaves_no_live_state(stack: Any) -> None:
    envoy = stack.envoys[0]
    key = create_key(stack, name="gone-soon", rpm_limit=500)
    headers = {"authorization": f"Bearer {key['key']}"}

    def live_source() -> str:
        dump = httpx.get(f"{envoy.admin_url}/config_dump", params={"resource": "ecds_filters"}, timeout=10)
        return str(dump.text)

    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda _: httpx.post(
                    f"{envoy.url}/v1/chat/completions",
                    json={"model": "qwen2", **CHAT},
                    headers=headers,
                    timeout=30,
                ),
                range(8),
            )
        )
    eventually(lambda: key["id"] in live_source(), 10, "the key in the live table")
    with admin_client(stack) as admin:
        assert admin.delete(f"/admin/keys/{key['id']}").status_code == 200
    eventually(lambda: key["id"] not in live_source(), 10, "the revoked key gone from the live table")


def test_the_remaining_count_holds_across_envoys(stack: Any) -> None:
    """The control plane counts a key's requests from every Envoy: what one Envoy served shows in the
    other's remaining count."""
    second = stack.start_envoy()
    eventually(lambda: httpx.get(f"{second.url}/health", timeout=5).status_code == 200, 20, "second Envoy up")
    key = create_key(stack, name="both", rpm_limit=500)
    headers = {"authorization": f"Bearer {key['key']}"}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda _: (
                    httpx.post(
                        f"{stack.envoys[0].url}/v1/chat/completions",
                        json={"model": "qwen2", **CHAT},
                        headers=headers,
                        timeout=30,
                    ).status_code
                ),
                range(20),
            )
        )
    assert statuses == [200] * 20

    def seen_on_the_other() -> bool:
        answer = httpx.post(
            f"{second.url}/v1/chat/completions", json={"model": "qwen2", **CHAT}, headers=headers, timeout=30
        )
        return answer.status_code == 200 and int(answer.headers["x-ratelimit-remaining-requests"]) <= 480

    eventually(seen_on_the_other, 15, "the first Envoy's requests in the second Envoy's remaining count")


def test_streams_in_flight_hold_their_max_tokens_against_the_tokens_per_minute(stack: Any) -> None:
    """Ten 8-second streams (max_tokens 400) of one key arriving 2 per second against 1,000 tokens per
    minute. Counted only at their end, all ten would run (4,000 tokens) before the first one ended; held
    up front (OpenAI's way), refusals start once the control plane has seen three in flight (1,200), so
    the streams admitted are bounded by three plus what arrives in the feedback time (generous here)."""
    envoy = stack.envoys[0]
    before = listener_changes(envoy.admin_url)
    tpm, streams, per_second, tokens = 1000, 10, 2.0, 400
    key = create_key(stack, name="held", tpm_limit=tpm)
    admitted, refused = stream_arrivals(envoy.url, key["key"], streams, per_second, tokens)
    print(f"admitted {len(admitted)}, refused {len(refused)}")
    assert refused, "no stream was refused: the held tokens did nothing"
    assert len(admitted) <= 3 + int(2.5 * per_second), admitted
    for response in refused:
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens", error
        assert response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert any("in flight" in r.json()["error"]["message"] for r in refused), refused[0].text
    assert listener_changes(envoy.admin_url) == before
