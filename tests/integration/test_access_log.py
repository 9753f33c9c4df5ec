"""What an operator sees of each request: Envoy's JSON access log (rotated), and the errors Envoy answers
itself counted per model and code in the control plane's metrics."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from control_plane.devstack.logrotate import AccessLogRotator, RotationPolicy
from control_plane.devstack.procs import free_port
from control_plane.xds.auth import log_token
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, eventually, prometheus_value
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@pytest.fixture
def stack(make_stack: StackFactory) -> Any:
    return make_stack(
        registry(
            model("qwen2", "tgi", [free_port()], aliases=["qwen"]),
            model("off", "vllm", [free_port()], enabled=False),
            model("empty", "vllm", []),
        )
    )


def log_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The access log's lines by request id (every line must be one JSON object)."""
    if not path.exists():
        return {}
    return {entry["request_id"]: entry for entry in map(json.loads, path.read_text().splitlines())}


def test_every_request_is_logged_as_json_with_its_figures(stack: Any) -> None:
    url = stack.envoys[0].url
    path = stack.access_log_path("gateway-0")
    sent = {
        "ok": ("POST", "/v1/chat/completions", {"model": "qwen", **CHAT}),
        "stream": ("POST", "/v1/chat/completions", {"model": "qwen2", "stream": True, **CHAT}),
        "unknown": ("POST", "/v1/chat/completions", {"model": "gpt-9", **CHAT}),
        "disabled": ("POST", "/v1/completions", {"model": "off", "prompt": "x"}),
        "method": ("PUT", "/v1/chat/completions", {"model": "qwen2", **CHAT}),
    }
    with httpx.Client(timeout=10) as client:
        for name, (method, api, body) in sent.items():
            response = client.request(
                method, f"{url}{api}", json=body, headers={"x-request-id": f"log-{name}"}
            )
            response.read()
    eventually(lambda: {f"log-{n}" for n in sent} <= set(log_entries(path)), 10, "the access log lines")
    entries = log_entries(path)

    ok = entries["log-ok"]
    assert (ok["method"], ok["path"], ok["status"], ok["model"], ok["route"]) == (
        "POST",
        "/v1/chat/completions",
        200,
        "qwen",
        "model:qwen",
    )
    assert ok["endpoint"] == "qwen2-0" and ok["upstream"].startswith("127.0.0.1:")
    assert ok["flags"] == "-" and ok["error"] is None and ok["attempts"] == 1
    assert isinstance(ok["duration_ms"], int) and isinstance(ok["ttfb_ms"], int)
    assert 0 <= ok["ttfb_ms"] <= ok["duration_ms"]
    assert ok["bytes_in"] > 0 and ok["bytes_out"] > 0
    assert ok["time"].endswith("Z") and "T" in ok["time"]
    assert entries["log-stream"]["status"] == 200 and entries["log-stream"]["endpoint"] == "qwen2-0"

    for name, status, code, route in (
        ("unknown", 404, "model_not_found", "unknown-model"),
        ("disabled", 503, "model_disabled", "disabled:off"),
        ("method", 405, "method_not_allowed", "inference-method"),
    ):
        entry = entries[f"log-{name}"]
        assert (entry["status"], entry["error"], entry["route"]) == (status, code, route), entry
        assert entry["endpoint"] is None and entry["details"] == "direct_response"


def test_access_log_rotates_and_envoy_reopens_it(stack: Any) -> None:
    url = stack.envoys[0].url
    path = stack.access_log_path("gateway-0")
    rotator = AccessLogRotator(
        lambda: [(path, stack.envoys[0].admin_url)], RotationPolicy(max_bytes=1, keep=2), interval_s=0
    )
    with httpx.Client(timeout=10) as client:
        for round_ in range(3):
            request_id = f"rotation-{round_}"
            client.post(
                f"{url}/v1/chat/completions", json={"model": "nope"}, headers={"x-request-id": request_id}
            )
            eventually(lambda: request_id in log_entries(path), 30, f"{request_id} in the live log")  # noqa: B023
            assert rotator.check() == [path]
            assert not path.exists() or request_id not in log_entries(path)
            assert request_id in log_entries(path.with_name(path.name + ".1"))
    # Two rotated files kept: the last two rounds; the first one's file was deleted.
    assert "rotation-1" in log_entries(path.with_name(path.name + ".2"))
    assert not path.with_name(path.name + ".3").exists()
    with httpx.Client(timeout=10) as client:
        client.post(f"{url}/v1/chat/completions", json={"model": "nope"}, headers={"x-request-id": "after"})
    # Envoy flushes a reopened file on its file flush timer (1 s in the local stack).
    eventually(lambda: "after" in log_entries(path), 30, "a new line in the reopened file")


def test_errors_envoy_answers_itself_are_counted_per_model_and_code(stack: Any) -> None:
    url = stack.envoys[0].url
    metrics_url = f"{stack.admin_url}/metrics"
    cases = [
        # (method, path, body, status, model label, code, stage)
        (
            "POST",
            "/v1/chat/completions",
            {"model": "gpt-9", **CHAT},
            404,
            "(unknown)",
            "model_not_found",
            "route",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "made-up", **CHAT},
            404,
            "(unknown)",
            "model_not_found",
            "route",
        ),
        ("POST", "/v1/completions", {"model": "off", "prompt": "x"}, 503, "off", "model_disabled", "route"),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "empty", **CHAT},
            503,
            "empty",
            "model_unavailable",
            "upstream",
        ),
        (
            "PUT",
            "/v1/chat/completions",
            {"model": "qwen", **CHAT},
            405,
            "qwen2",
            "method_not_allowed",
            "route",
        ),
        ("POST", "/v1/chat/completions", {"messages": []}, 400, "(none)", "invalid_request", "route"),
    ]
    rounds = 10
    with httpx.Client(timeout=10) as client:

        def call(case: tuple[Any, ...]) -> int:
            return client.request(case[0], f"{url}{case[1]}", json=case[2]).status_code

        with ThreadPoolExecutor(max_workers=24) as pool:  # tens in flight
            statuses = list(pool.map(call, cases * rounds))
        assert statuses == [c[3] for c in cases] * rounds
        ok = client.post(f"{url}/v1/chat/completions", json={"model": "qwen2", **CHAT})
        assert ok.status_code == 200

        expected: dict[tuple[str, str, str, str], float] = {}
        for _, _, _, status, model_label, code, stage in cases:
            key = (model_label, code, str(status), stage)
            expected[key] = expected.get(key, 0) + rounds

        def counted() -> dict[tuple[str, str, str, str], float]:
            return {
                key: prometheus_value(
                    client,
                    metrics_url,
                    "llm_gateway_local_replies_total",
                    model=key[0],
                    code=key[1],
                    status=key[2],
                    stage=key[3],
                )
                for key in expected
            }

        eventually(lambda: counted() == expected, 15, "the local replies counted per model and code")

    # The status page's error figures include Envoy's own 5xx, though no model server saw them.
    with admin_client(stack) as admin:

        def errors_seen(model_id: str) -> bool:
            figures = admin.get("/admin/timeseries").json()["models"].get(model_id, {})
            return any(v for v in figures.get("error_qps", []) if v)

        eventually(lambda: errors_seen("off") and errors_seen("empty"), 15, "error_qps of off and empty")
    with httpx.Client(timeout=10) as client:
        # Answers of the model servers are not local replies.
        assert (
            prometheus_value(
                client, metrics_url, "llm_gateway_local_replies_total", model="qwen2", status="200"
            )
            == 0
        )


def test_an_access_log_stream_without_the_node_credential_counts_nothing(stack: Any) -> None:
    entry_message = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(
            node=base_pb2.Node(id="gateway-0"), log_name="gateway-local-replies"
        )
    )
    entry_message.http_logs.log_entry.add().response.response_code.value = 503
    metrics_url = f"{stack.admin_url}/metrics"

    def send(metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
        with grpc.insecure_channel(f"127.0.0.1:{stack.xds_port}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            try:
                stub.StreamAccessLogs(iter([entry_message]), metadata=metadata, timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert send(()) == grpc.StatusCode.UNAUTHENTICATED
    assert send((("authorization", "Bearer xds1.forged"),)) == grpc.StatusCode.PERMISSION_DENIED
    with httpx.Client(timeout=10) as client:
        assert prometheus_value(client, metrics_url, "llm_gateway_local_replies_total", status="503") == 0
    # A node's ADS credential is not the access-log one.
    assert send((("authorization", f"Bearer {stack.xds_token('gateway-0')}"),)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # The access-log credential is accepted (Envoy itself sends exactly this, from its listener).
    assert send((("authorization", f"Bearer {log_token(stack.settings.xds_secret)}"),)) == grpc.StatusCode.OK
    with httpx.Client(timeout=10) as client:
        assert prometheus_value(client, metrics_url, "llm_gateway_local_replies_total", status="503") == 1
