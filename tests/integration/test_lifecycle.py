"""Launched models through the real Envoy, control plane and simulated engines: models found in a
directory start cold, the first requests are held by the activator while one load runs and then answered
(streams too), a memory budget for one model swaps them on demand without failing a request, a failed
load answers its held requests with the reason, and a new folder is found without a restart."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, eventually, prometheus_value
from tests.support.registries import model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIM_MODELS = REPO / "deploy" / "models-sim"
QWEN, LLAMA = "qwen2-0.5b-instruct", "llama-3.2-1b-instruct"


def _models_dir(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(SIM_MODELS, target)
    return target


def _doc(models_dir: Path, budget_mb: int | None = None, *models: dict[str, Any]) -> dict[str, Any]:
    lifecycle: dict[str, Any] = {"model_dirs": [{"path": str(models_dir)}], "scan_interval_s": 3600}
    if budget_mb is not None:
        lifecycle["gpu_memory_mb"] = budget_mb
    return {"gateway": {"expose_upstream_host": True}, "lifecycle": lifecycle, "models": list(models)}


def _chat(url: str, model_id: str, stream: bool = False, timeout: float = 60) -> httpx.Response:
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": stream,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def _state(stack: Any, model_id: str) -> str:
    with admin_client(stack) as admin:
        return str(admin.get(f"/admin/models/{model_id}").json()["state"])


def test_a_cold_model_loads_once_for_many_held_requests(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = make_stack(_doc(_models_dir(tmp_path)))
    url = stack.envoys[0].url
    with admin_client(stack) as admin:
        overview = admin.get("/admin/lifecycle").json()
    assert overview["models"][QWEN]["state"] == "cold"
    kinds = {d["id"]: (d["kind"], d["problem"]) for d in overview["discovered"]}
    assert kinds[QWEN][0] == "chat" and kinds["bge-small-en-v1.5"][0] == "embedding"
    assert kinds["notes"][1]  # listed, with why it is not a model
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert {QWEN, LLAMA} <= {m["id"] for m in models}

    # 20 requests at once for the cold model (streams among them): held, one load, all answered.
    def call(index: int) -> tuple[int, str]:
        response = _chat(url, QWEN, stream=bool(index % 2))
        return response.status_code, response.text

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(call, range(20)))
    assert [status for status, _ in answers] == [200] * 20, answers[:2]
    assert all("[DONE]" in text for i, (_, text) in enumerate(answers) if i % 2)
    assert _state(stack, QWEN) == "ready"
    metrics = f"{stack.admin_url}/metrics"
    with httpx.Client(timeout=10) as client:
        assert prometheus_value(client, metrics, "llm_gateway_model_cold_starts_total") == 1
    # Warm: Envoy goes to the replica itself, not through the activator.
    warm = _chat(url, QWEN)
    assert warm.status_code == 200
    with admin_client(stack) as admin:
        replica = admin.get("/admin/lifecycle").json()["models"][QWEN]["replicas"][0]["address"]
    assert warm.headers["x-served-by"] == replica


def test_a_budget_for_one_model_swaps_them_without_failing_a_request(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = make_stack(_doc(_models_dir(tmp_path), budget_mb=4096))
    url = stack.envoys[0].url
    statuses = []
    for model_id in (QWEN, LLAMA, QWEN, LLAMA):
        statuses.append(_chat(url, model_id).status_code)
        assert _state(stack, model_id) == "ready"
        other = LLAMA if model_id == QWEN else QWEN
        assert _state(stack, other) == "cold"  # unloaded to make room
    assert statuses == [200] * 4
    with admin_client(stack) as admin:
        events = [e["event"] for e in admin.get("/admin/lifecycle").json()["events"]]
    assert events.count("unloaded") >= 3


def test_a_stream_in_flight_is_drained_before_its_model_is_evicted(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = make_stack(_doc(_models_dir(tmp_path), budget_mb=4096))
    url = stack.envoys[0].url
    assert _chat(url, QWEN).status_code == 200  # loaded
    body = {"model": QWEN, "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": "x"}]}
    with ThreadPoolExecutor(2) as pool:

        def stream() -> list[str]:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                return [line for line in r.iter_lines() if line.startswith("data: ")]

        streaming = pool.submit(stream)
        time.sleep(0.3)
        other = pool.submit(_chat, url, LLAMA)  # needs qwen's memory: qwen drains first
        chunks = streaming.result(60)
        assert other.result(60).status_code == 200
    assert chunks[-1] == "data: [DONE]" and len(chunks) > 100


def test_a_failed_load_answers_held_requests_with_its_reason(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    broken = model("broken", "vllm", [], launch={"launcher": "vllm", "path": str(tmp_path)})
    broken.pop("endpoints")
    stack = make_stack(_doc(_models_dir(tmp_path), None, broken))
    response = _chat(stack.envoys[0].url, "broken")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "model_load_failed"
    assert _state(stack, "broken") == "failed"
    with admin_client(stack) as admin:
        assert admin.get("/admin/models/broken").json()["lifecycle"]["reason"]


def test_a_new_folder_is_found_without_a_restart(make_stack: StackFactory, tmp_path: Path) -> None:
    models_dir = _models_dir(tmp_path)
    stack = make_stack(_doc(models_dir))
    url = stack.envoys[0].url
    new = models_dir / "tinyllama-chat"
    new.mkdir()
    (new / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 256,
                "num_hidden_layers": 2,
                "intermediate_size": 512,
                "vocab_size": 1000,
                "torch_dtype": "float16",
            }
        )
    )
    with admin_client(stack) as admin:
        assert admin.post("/admin/lifecycle/scan").json()["changed"] is True
    eventually(lambda: _chat(url, "tinyllama-chat").status_code == 200, 30, "the new model answering")


def test_activation_timeout_idle_unload_and_pinning(make_stack: StackFactory, tmp_path: Path) -> None:
    slow = model(
        "slow", "vllm", [], launch={"launcher": "simulator", "load_time_s": 8, "activation_timeout_s": 1}
    )
    idle = model("idle", "vllm", [], launch={"launcher": "simulator", "load_time_s": 0.5, "idle_unload_s": 2})
    for doc in (slow, idle):
        doc.pop("endpoints")
    stack = make_stack(_doc(_models_dir(tmp_path), None, slow, idle))
    url = stack.envoys[0].url
    # Held past its activation timeout: 503 with retry-after; the load goes on and a later request is served.
    response = _chat(url, "slow")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_loading_timeout" and response.headers["retry-after"]
    eventually(lambda: _state(stack, "slow") == "ready", 30, "the slow model loaded")
    assert _chat(url, "slow").status_code == 200
    # Unused for its idle time: unloaded; pinned: kept.
    assert _chat(url, "idle").status_code == 200
    eventually(lambda: _state(stack, "idle") == "cold", 20, "the idle model unloaded")
    with admin_client(stack) as admin:
        assert admin.post("/admin/models/idle/pin").json()["pinned"] is True
        assert admin.post("/admin/models/idle/load").json()["state"] == "ready"
    time.sleep(4)
    assert _state(stack, "idle") == "ready"
    with admin_client(stack) as admin:
        assert admin.post("/admin/models/idle/unload").json()["state"] == "cold"
        assert admin.post("/admin/models/nope/load").status_code == 404


def _replicas(stack: Any, model_id: str) -> list[dict[str, Any]]:
    with admin_client(stack) as admin:
        return list(admin.get(f"/admin/models/{model_id}").json()["lifecycle"]["replicas"])


def test_replicas_scale_up_under_queueing_and_back_down_after_the_cooldown(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    # Two requests at a time per replica, 8 tokens of 40 ms each: 24 clients keep ~22 queued on one.
    busy = model(
        "busy",
        "vllm",
        [],
        launch={
            "launcher": "simulator",
            "load_time_s": 0.5,
            "max_replicas": 2,
            "extra_args": ["--max-batch", "2", "--decode-ms-per-token", "40"],
            "autoscale": {"target_queue_depth": 2, "scale_up_after_s": 1, "scale_down_cooldown_s": 3},
        },
    )
    warm = model("warm", "vllm", [], launch={"launcher": "simulator", "load_time_s": 0.5, "min_replicas": 1})
    for doc in (busy, warm):
        doc.pop("endpoints")
    (tmp_path / "none").mkdir()
    stack = make_stack(_doc(tmp_path / "none", None, busy, warm))
    url, metrics = stack.envoys[0].url, f"{stack.admin_url}/metrics"
    # min_replicas: 1 is loaded at start, without a request.
    eventually(lambda: _state(stack, "warm") == "ready", 20, "the model with a minimum loaded")
    assert _state(stack, "busy") == "cold"

    stop = threading.Event()
    served_by: set[str] = set()
    statuses: list[int] = []
    body = {"model": "busy", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{url}/v1/chat/completions", json=body)
                statuses.append(response.status_code)
                served_by.add(response.headers.get("x-served-by", ""))

    def scaled_out() -> bool:
        ready = [r["address"] for r in _replicas(stack, "busy") if r["state"] == "ready"]
        return len(ready) == 2 and set(ready) <= served_by

    with ThreadPoolExecutor(24) as pool:
        clients = [pool.submit(client) for _ in range(24)]
        try:
            eventually(scaled_out, 30, "two ready replicas, both serving through Envoy")
            with httpx.Client(timeout=10) as http:
                assert (
                    prometheus_value(http, metrics, "llm_gateway_model_desired_replicas", model="busy") == 2
                )
                ready = prometheus_value(
                    http, metrics, "llm_gateway_model_replicas", model="busy", state="ready"
                )
                assert ready == 2
        finally:
            stop.set()
        for done in clients:
            done.result(60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))

    # The load stopped: after the cooldown one replica is drained and stopped, never the last one.
    eventually(lambda: len(_replicas(stack, "busy")) == 1, 30, "back to one replica")
    assert _state(stack, "busy") == "ready" and _state(stack, "warm") == "ready"
    with httpx.Client(timeout=10) as http:
        assert prometheus_value(http, metrics, "llm_gateway_model_desired_replicas", model="busy") == 1
    with admin_client(stack) as admin:
        events = [(e["model"], e["event"]) for e in admin.get("/admin/lifecycle").json()["events"]]
    assert ("busy", "replica stopped") in events and ("busy", "replica ready") in events
    assert _chat(url, "busy").status_code == 200


def test_the_admin_sets_a_models_replicas(make_stack: StackFactory, tmp_path: Path) -> None:
    scaled = model(
        "scaled", "vllm", [], launch={"launcher": "simulator", "load_time_s": 0.5, "max_replicas": 2}
    )
    scaled.pop("endpoints")
    stack = make_stack(_doc(_models_dir(tmp_path), None, scaled))
    with admin_client(stack) as admin:
        assert admin.post("/admin/models/scaled/replicas", json={"count": 3}).status_code == 422
        assert admin.post("/admin/models/scaled/replicas", json={"count": "two"}).status_code == 422
        assert admin.post("/admin/models/nope/replicas", json={"count": 1}).status_code == 404
        # A cold model told to run two replicas loads them, without a request.
        answer = admin.post("/admin/models/scaled/replicas", json={"count": 2})
        assert answer.status_code == 200 and answer.json()["fixed_replicas"] == 2

        def ready() -> int:
            replicas = admin.get("/admin/lifecycle").json()["models"]["scaled"]["replicas"]
            return sum(1 for r in replicas if r.get("state", "ready") == "ready")

        eventually(lambda: ready() == 2, 30, "two ready replicas")
        served = {_chat(stack.envoys[0].url, "scaled").headers["x-served-by"] for _ in range(12)}
        assert len(served) == 2  # Envoy balances over both
        assert admin.post("/admin/models/scaled/replicas", json={"count": 1}).status_code == 200
        eventually(lambda: ready() == 1, 30, "back to one replica")
