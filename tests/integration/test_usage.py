"""Usage per API key through real Envoys and the control plane's access-log stream: a key with a small
tokens-per-minute limit is refused (OpenAI SDK `RateLimitError`, `rate_limit_exceeded`) on every Envoy
once it has used its tokens, streamed answers counted (with the usage chunk, or charged their
`max_tokens` without it); the counts in /metrics and in the usage API agree and survive a control-plane
restart, and a budget used up before the restart is refused again after it."""

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
from tests.support.gateway import admin_client, eventually
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Say something short."}]


def create_key(stack: Any, **settings: Any) -> dict[str, Any]:
    with admin_client(stack) as admin:
        response = admin.post("/admin/keys", json=settings)
    assert response.status_code == 201, response.text
    return dict(response.json())


def usage(stack: Any, key_id: str, **params: str) -> dict[str, Any]:
    with admin_client(stack) as admin:
        response = admin.get(f"/admin/keys/{key_id}/usage", params={"since": "1h", **params})
    assert response.status_code == 200, response.text
    return dict(response.json())


def metric(stack: Any, name: str, **labels: str) -> float:
    text = httpx.get(f"{stack.admin_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def call(client: openai.OpenAI, kind: str) -> None:
    """One chat call: plain, streamed with the usage chunk, or streamed without it."""
    args: dict[str, Any] = {"model": "qwen", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    if kind == "plain":
        assert client.chat.completions.create(**args).usage is not None
        return
    options = {"stream_options": {"include_usage": True}} if kind == "stream_usage" else {}
    chunks = list(client.chat.completions.create(stream=True, **args, **options))
    assert chunks
    if kind == "stream_usage":
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_token_limit_on_every_envoy_usage_counted_and_kept_across_a_restart(make_stack: StackFactory) -> None:
    doc = registry(model("qwen2", "tgi", [free_port()], aliases=["qwen"]))
    doc["auth"] = {"mode": "api_key"}
    stack = make_stack(doc)
    second = stack.start_envoy()
    urls = [stack.envoys[0].url, second.url]
    eventually(lambda: httpx.get(f"{urls[1]}/health", timeout=5).status_code == 200, 20, "second Envoy up")
    tpm_limit = 400
    key = create_key(stack, name="small", tpm_limit=tpm_limit)
    clients = [openai.OpenAI(base_url=f"{u}/v1", api_key=key["key"], max_retries=0) for u in urls]

    # Calls of all three kinds, alternating Envoys, until the key is refused. The access log reaches
    # the control plane within about a second, so the refusal comes within a few calls of the limit.
    made: dict[str, int] = {"plain": 0, "stream_usage": 0, "stream_no_usage": 0}
    kinds = list(made)
    refused: openai.RateLimitError | None = None
    for index in range(200):
        kind = kinds[index % 3]
        try:
            call(clients[index % 2], kind)
        except openai.RateLimitError as exc:
            refused = exc
            break
        made[kind] += 1
        time.sleep(0.1)
    assert refused is not None, f"never refused after {made}"
    assert refused.code == "rate_limit_exceeded"
    assert int(refused.response.headers["retry-after"]) > 0
    assert all(made.values()), made
    # Refused on every Envoy (the key table pushed to both).
    for client in clients:
        with pytest.raises(openai.RateLimitError) as again:
            call(client, "plain")
        assert again.value.code == "rate_limit_exceeded"
    ok = sum(made.values())

    # The usage API: every call counted, the streams too, the refusals as rate_limited.
    def counted() -> bool:
        totals = usage(stack, key["id"])["totals"]
        return bool(totals["requests"] == ok + 3 and totals["rate_limited"] == 3)

    eventually(counted, 15, "every call in the usage API")
    body = usage(stack, key["id"])
    totals = body["totals"]
    assert body["key_name"] == "small" and [r["model"] for r in body["rows"]] == ["qwen2"]
    # Streams without a usage chunk are charged their max_tokens ("estimated"); so is a stream whose
    # client hung up before Envoy saw its clean end (the SDK may close right after `[DONE]`): Envoy
    # publishes usage only at a clean end. Never fewer, never a plain answer.
    assert totals["errors"] == 0
    assert made["stream_no_usage"] <= totals["estimated"] <= made["stream_no_usage"] + made["stream_usage"]
    assert totals["total_tokens"] >= tpm_limit
    assert totals["completion_tokens"] >= MAX_TOKENS * made["stream_no_usage"]
    assert totals["prompt_tokens"] > 0
    # Prometheus: the same counts, labelled by the key's name and the model's id.
    assert metric(stack, "llm_gateway_key_requests_total", key="small", model="qwen2", code="ok") == ok
    assert metric(stack, "llm_gateway_key_requests_total", key="small", code="rate_limit_exceeded") == 3
    prompt = metric(stack, "llm_gateway_key_tokens_total", key="small", model="qwen2", kind="prompt")
    completion = metric(stack, "llm_gateway_key_tokens_total", key="small", model="qwen2", kind="completion")
    assert (prompt, completion) == (totals["prompt_tokens"], totals["completion_tokens"])
    with admin_client(stack) as admin:
        top = admin.get("/admin/usage/top", params={"window": "1h"}).json()
    assert top["keys"][0]["key_name"] == "small" and top["keys"][0]["total_tokens"] == totals["total_tokens"]

    # A budget used up: refused with insufficient_quota.
    budget = create_key(stack, name="budgeted", budget_tokens=60, budget_period="day")
    budget_client = openai.OpenAI(base_url=f"{urls[0]}/v1", api_key=budget["key"], max_retries=0)
    quota_error: openai.RateLimitError | None = None
    for _ in range(30):
        try:
            call(budget_client, "plain")
        except openai.RateLimitError as exc:
            quota_error = exc
            break
        time.sleep(0.3)
    assert quota_error is not None and quota_error.code == "insufficient_quota"
    eventually(lambda: usage(stack, budget["id"])["totals"]["rate_limited"] >= 1, 15, "the refusal counted")
    before = usage(stack, key["id"], by="minute")

    # A restart of the control plane loses no count, and refuses the used-up budget again, and the key
    # that used its tokens per minute seconds before it (its window seeded from the stored minutes).
    stack.stop_control_plane()
    stack.start_control_plane()
    after = usage(stack, key["id"], by="minute")
    assert after["totals"] == before["totals"] and after["rows"] == before["rows"]
    fresh = create_key(stack, name="after-restart")  # the key table pushed again to the Envoys
    fresh_client = openai.OpenAI(base_url=f"{urls[1]}/v1", api_key=fresh["key"], max_retries=0)
    eventually(lambda: _works(fresh_client), 20, "a key made after the restart working")
    for url in urls:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=budget["key"], max_retries=0)
        with pytest.raises(openai.RateLimitError) as still:
            call(client, "plain")
        assert still.value.code == "insufficient_quota"
    for client in clients:
        with pytest.raises(openai.RateLimitError) as still:
            call(client, "plain")
        assert still.value.code == "rate_limit_exceeded"


def _works(client: openai.OpenAI) -> bool:
    try:
        call(client, "plain")
    except openai.APIError:
        return False
    return True


def test_a_token_limit_holds_across_two_envoys(make_stack: StackFactory) -> None:
    """A key limited to L tokens per minute, asked for 3 L through two Envoys for half a minute (streams
    among the calls): the tokens it gets stay within 1.1 L, since any 60 s window may hold only L."""
    doc = registry(model("qwen2", "tgi", [free_port()], aliases=["qwen"]))
    doc["auth"] = {"mode": "api_key"}
    stack = make_stack(doc)
    second = stack.start_envoy()
    urls = [stack.envoys[0].url, second.url]
    limit = 3000
    key = create_key(stack, name="tpm-limited", tpm_limit=limit)
    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=key["key"], max_retries=0) for url in urls]
    duration_s, calls_per_s = 30.0, 5  # about 30 tokens a call: 3 L per minute
    used: list[int] = []
    refused: list[str] = []
    lock = threading.Lock()
    started = time.monotonic() + 0.5

    def one(index: int) -> None:
        time.sleep(max(0.0, started + index / calls_per_s - time.monotonic()))
        args: dict[str, Any] = {"model": "qwen", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        try:
            if index % 3:
                answer = clients[index % 2].chat.completions.create(**args)
                tokens = answer.usage.total_tokens if answer.usage else 0
            else:  # a stream with its usage chunk
                chunks = clients[index % 2].chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **args
                )
                tokens = sum(c.usage.total_tokens for c in chunks if c.usage)
        except openai.RateLimitError as error:
            with lock:
                refused.append(str(error.code))
            return
        with lock:
            used.append(tokens)

    with ThreadPoolExecutor(16) as pool:  # tens of calls in flight at the peaks
        list(pool.map(one, range(int(duration_s * calls_per_s))))
    total = sum(used)
    assert total <= 1.1 * limit, (total, len(used), len(refused))
    assert total >= 0.6 * limit, total  # limited, not blocked
    assert refused and set(refused) == {"rate_limit_exceeded"}
