"""POST /v1/generate (the seeds' API) through the real Envoy, control plane and simulated engines."""
# ruff: noqa: RUF001  (the seeds' curl examples are verbatim, full-width punctuation included)

from __future__ import annotations

import json
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory, write_config
from tests.support.gateway import eventually, prometheus_value
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

# The seeds' five curl examples (seed 001), verbatim but for the port.
SEED_CURLS = [
    """curl http://localhost:8000/v1/generate -X POST \\
  -H "Content-Type: application/json" \\
  -d '{
    "model_id": "qwen2",
    "inputs": "你好",
    "parameters": {
      "max_new_tokens": 64,
      "temperature": 0.7,
      "top_p": 0.9
    }
  }'""",
    """curl http://localhost:8000/v1/generate -X POST \\
  -H "Content-Type: application/json" \\
  -d '{
    "model_id": "llama3",
    "inputs": "Hello, how are you?",
    "parameters": {
      "max_new_tokens": 64
    }
  }'""",
    """curl http://localhost:8000/v1/generate -X POST \\
  -H "Content-Type: application/json" \\
  -d '{
    "model_id": "llama3",
    "inputs": "光合作用的原理是什么？",
    "scenario": "qa",
    "parameters": {
      "max_new_tokens": 128,
      "temperature": 0.5
    }
  }'""",
    """curl http://localhost:8000/v1/generate -X POST \\
  -H "Content-Type: application/json" \\
  -d '{
    "model_id": "qwen2",
    "inputs": "人工智能是计算机科学的一个分支，旨在创建能够执行通常需要人类智能的任务的系统……",
    "scenario": "summarize",
    "parameters": {
      "max_new_tokens": 100
    }
  }'""",
    """curl http://localhost:8000/v1/generate -X POST \\
  -H "Content-Type: application/json" \\
  -d '{
    "model_id": "llama3",
    "inputs": "这个产品非常好，大家都很喜欢。",
    "scenario": "rewrite",
    "parameters": {
      "max_new_tokens": 64,
      "temperature": 0.9
    }
  }'""",
]


@pytest.fixture
def stack(make_stack: StackFactory) -> Any:
    return make_stack(
        registry(
            model("qwen2", "tgi", [free_port()], aliases=["qwen"]),
            model("llama3", "vllm", [free_port()]),
            model("sg", "sglang", [free_port()], scenarios={"poem": {"user": "Write a poem about {inputs}"}}),
        )
    )


def _generate(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/generate", json=body, timeout=30)


def _check_answer(answer: dict[str, Any], model_name: str) -> None:
    assert set(answer) == {"generated_text", "model", "tokens", "finish_reason", "usage"}
    assert isinstance(answer["generated_text"], str) and answer["generated_text"]
    assert answer["model"] == model_name
    assert answer["tokens"] == answer["usage"]["completion_tokens"] > 0
    assert answer["finish_reason"] in ("stop", "length")


def test_the_seeds_five_curl_examples_verbatim(stack: Any) -> None:
    port = stack.envoys[0].url.rsplit(":", 1)[1]
    for example in SEED_CURLS:
        # Run by a shell, as a user would paste it (line continuations and quotes included).
        command = example.replace("localhost:8000", f"127.0.0.1:{port}") + " -sS -w '\\n%{http_code}'"
        done = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60, check=True)
        body, _, status = done.stdout.decode().rpartition("\n")
        assert status == "200", body
        sent = json.loads(shlex.split(example)[-1])
        _check_answer(json.loads(body), sent["model_id"])


def test_every_chat_engine_and_the_parameters_reach_it(stack: Any) -> None:
    url = stack.envoys[0].url
    for name in ("qwen2", "qwen", "llama3", "sg"):
        response = _generate(url, {"model_id": name, "inputs": "hi", "parameters": {"max_new_tokens": 3}})
        assert response.status_code == 200, response.text
        answer = response.json()
        # max_new_tokens became max_tokens: the engine stopped at the limit it was given.
        assert answer["tokens"] == 3 and answer["finish_reason"] == "length"
        assert answer["model"] == ("qwen2" if name == "qwen" else name)
    # The scenario's template reaches the engine: a longer prompt than the bare input.
    bare = _generate(url, {"model_id": "llama3", "inputs": "hi"}).json()
    qa = _generate(url, {"model_id": "llama3", "inputs": "hi", "scenario": "qa"}).json()
    assert qa["usage"]["prompt_tokens"] > bare["usage"]["prompt_tokens"]
    poem = _generate(url, {"model_id": "sg", "inputs": "hi", "scenario": "poem"})
    assert poem.status_code == 200, poem.text
    params = {"seed": 7, "stop": ["\n"], "repetition_penalty": 1.1, "top_p": 0.5, "temperature": 0.1}
    assert _generate(url, {"model_id": "sg", "inputs": "hi", "parameters": params}).status_code == 200


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    return str(error["message"])


def test_errors_in_the_gateways_json(stack: Any) -> None:
    url = stack.envoys[0].url
    message = _error(_generate(url, {"model_id": "nope", "inputs": "hi"}), 404, "model_not_found")
    assert "nope" in message
    message = _error(
        _generate(url, {"model_id": "llama3", "inputs": "hi", "scenario": "x"}), 400, "invalid_request"
    )
    assert "`x`" in message and "qa, rewrite, summarize" in message
    # The per-model scenario is known to its model alone.
    message = _error(
        _generate(url, {"model_id": "llama3", "inputs": "hi", "scenario": "poem"}), 400, "invalid_request"
    )
    assert "poem" in message
    assert "inputs" in _error(_generate(url, {"model_id": "llama3"}), 400, "invalid_request")
    assert "inputs" in _error(_generate(url, {"model_id": "llama3", "inputs": 5}), 400, "invalid_request")
    message = _error(
        _generate(url, {"model_id": "llama3", "inputs": "hi", "parameters": {"top_k": 5}}),
        400,
        "invalid_request",
    )
    assert "`top_k`" in message
    message = _error(
        _generate(url, {"model_id": "llama3", "inputs": "hi", "extra": 1}), 400, "invalid_request"
    )
    assert "`extra`" in message
    message = _error(
        _generate(url, {"model_id": "qwen2", "inputs": "hi", "parameters": {"repetition_penalty": 1.2}}),
        400,
        "invalid_request",
    )
    assert "repetition_penalty" in message and "tgi" in message
    assert "model_id" in _error(_generate(url, {"inputs": "hi"}), 400, "invalid_request")
    bad = httpx.post(f"{url}/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    _error(bad, 400, "invalid_request")
    assert httpx.get(f"{url}/v1/generate").status_code == 405
    # Valid JSON for json_to_metadata, too deep for the filter's reader: still a clear 400.
    deep = '{"model_id": "llama3", "inputs": ' + "[" * 100 + "]" * 100 + "}"
    deep_response = httpx.post(
        f"{url}/v1/generate", content=deep, headers={"content-type": "application/json"}
    )
    assert "nested too deeply" in _error(deep_response, 400, "invalid_request")
    assert "`parameters`" in _error(
        _generate(url, {"model_id": "llama3", "inputs": "hi", "parameters": [1]}), 400, "invalid_request"
    )


def test_streaming_arrives_as_events_over_time(make_stack: StackFactory) -> None:
    # A slow decode, so that the events are spread over time and buffering would show.
    stack = make_stack(
        registry(model("llama3", "vllm", [free_port()])),
        sim_extra_args={"llama3-0": ["--decode-ms-per-token", "40"]},
    )
    url = stack.envoys[0].url
    arrivals: list[float] = []
    events: list[Any] = []
    body = {"model_id": "llama3", "inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 20}}
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]"
    final = events[-2]
    pieces = [e["text"] for e in events[:-2]]
    assert len(pieces) == 20 and "".join(pieces) == final["generated_text"]
    assert final["tokens"] == 20 and final["model"] == "llama3" and final["finish_reason"] == "length"
    # Events came as the engine produced them, not all at once at the end.
    assert arrivals[-1] - arrivals[0] > 0
    assert len({round(t, 3) for t in arrivals}) > 2


def test_engines_receive_the_served_model_name_whatever_name_the_client_used(
    make_stack: StackFactory,
) -> None:
    served = "Qwen2-7B-Instruct-GPTQ-Int4"
    # The engine knows only its own name (and the alias `qwen`, which the local stack passes it): a
    # request reaching it with `qwen2` would get the engine's 404.
    stack = make_stack(
        registry(model("qwen2", "vllm", [free_port()], aliases=["qwen"], served_model=served)),
        sim_extra_args={"qwen2-0": ["--model-id", served]},
    )
    url = stack.envoys[0].url
    tricky = 'say {"model": "qwen2"} back'
    for name in ("qwen2", "qwen"):
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": tricky}], "max_tokens": 2},
            timeout=30,
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["model"] == served
        completion = httpx.post(
            f"{url}/v1/completions", json={"prompt": "hi", "model": name, "max_tokens": 2}, timeout=30
        )
        assert completion.status_code == 200, completion.text
        answer = _generate(url, {"model_id": name, "inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == served
    # Streams pass through the renaming untouched.
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2


def test_a_scenario_added_to_the_registry_is_served_after_a_reload(make_stack: StackFactory) -> None:
    doc = registry(model("llama3", "vllm", [free_port()]))
    stack = make_stack(doc)
    url = stack.envoys[0].url
    body = {"model_id": "llama3", "inputs": "hi", "scenario": "translate"}
    assert _generate(url, body).status_code == 400
    write_config(stack, {**doc, "scenarios": {"translate": {"system": "Translate.", "user": "EN: {inputs}"}}})
    eventually(lambda: _generate(url, body).status_code == 200, what="the new scenario served")
    # The defaults are still there next to it.
    assert _generate(url, {**body, "scenario": "qa"}).status_code == 200


def test_calls_are_counted_per_model_and_scenario_with_latency_and_tokens(stack: Any) -> None:
    """The seeds' dashboards: requests, latency, tokens in and out, errors by kind, per model and scenario,
    counted by the control plane from Envoy's access-log stream (tens of calls in flight)."""
    url = stack.envoys[0].url
    calls: list[tuple[dict[str, Any], int]] = [
        ({"model_id": "qwen", "inputs": "hi", "scenario": "qa", "parameters": {"max_new_tokens": 5}}, 200),
        ({"model_id": "llama3", "inputs": "hi", "parameters": {"max_new_tokens": 7}}, 200),
        (
            {
                "model_id": "llama3",
                "inputs": "hi",
                "scenario": "summarize",
                "stream": True,
                "parameters": {"max_new_tokens": 3},
            },
            200,
        ),
        (
            {"model_id": "sg", "inputs": "the sea", "scenario": "poem", "parameters": {"max_new_tokens": 4}},
            200,
        ),
        ({"model_id": "nope", "inputs": "hi"}, 404),
        ({"model_id": "llama3", "inputs": "hi", "scenario": "x"}, 400),
    ]
    rounds = 8

    def call(item: tuple[dict[str, Any], int]) -> int:
        return _generate(url, item[0]).status_code

    with ThreadPoolExecutor(max_workers=24) as pool:
        assert list(pool.map(call, calls * rounds)) == [status for _, status in calls] * rounds

    metrics_url = f"{stack.admin_url}/metrics"
    requests = "llm_gateway_generate_requests_total"
    expected_requests = {
        ("qwen2", "qa", "200", "ok"): rounds,
        ("llama3", "none", "200", "ok"): rounds,
        ("llama3", "summarize", "200", "ok"): rounds,
        ("sg", "poem", "200", "ok"): rounds,
        ("(unknown)", "(none)", "404", "model_not_found"): rounds,
        ("llama3", "(none)", "400", "invalid_request"): rounds,
    }
    with httpx.Client(timeout=10) as client:

        def counted() -> dict[tuple[str, ...], float]:
            return {
                key: prometheus_value(
                    client, metrics_url, requests, model=key[0], scenario=key[1], status=key[2], code=key[3]
                )
                for key in expected_requests
            }

        eventually(lambda: counted() == expected_requests, 15, "/v1/generate calls per model and scenario")

        def value(sample: str, **labels: str) -> float:
            return prometheus_value(client, metrics_url, sample, **labels)

        tokens = "llm_gateway_generate_tokens_total"
        # Completion tokens are the engines' own counts: max_new_tokens each (the simulators fill it).
        assert value(tokens, model="qwen2", scenario="qa", kind="completion") == 5 * rounds
        assert value(tokens, model="llama3", scenario="none", kind="completion") == 7 * rounds
        assert (
            value(tokens, model="llama3", scenario="summarize", kind="completion") == 3 * rounds
        )  # streamed
        assert value(tokens, model="sg", scenario="poem", kind="prompt") > 0
        duration = "llm_gateway_generate_duration_seconds_count"
        assert value(duration, model="llama3", scenario="summarize", stream="true") == rounds
        assert value(duration, model="qwen2", scenario="qa", stream="false") == rounds
        first_byte = "llm_gateway_generate_time_to_first_byte_seconds_count"
        assert value(first_byte, model="llama3", scenario="summarize") == rounds
        assert value(first_byte, model="qwen2", scenario="qa") == 0  # not a stream
        # A chat call is not a /v1/generate call.
        before = value(requests, model="qwen2", scenario="qa", status="200", code="ok")
        chat = {"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert client.post(f"{url}/v1/chat/completions", json=chat).status_code == 200
        assert client.post(f"{url}/v1/generate", json=calls[0][0]).status_code == 200
        eventually(
            lambda: value(requests, model="qwen2", scenario="qa", status="200", code="ok") == before + 1,
            15,
            "the next call counted",
        )
        assert (
            sum(
                value(requests, model="qwen2", scenario=s, status="200", code="ok")
                for s in ("none", "(none)")
            )
            == 0
        )
