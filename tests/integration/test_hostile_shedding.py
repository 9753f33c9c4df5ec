"""The shedding filter and the high-priority route tried as a hostile client would, through a real Envoy
and control plane: priority headers in odd case, duplicated, empty or garbage, and clients claiming `high`
with keys on. Each request is served or shed by its real class (the key's, lowered by the header only),
never answered 5xx other than the gateway's `model_overloaded`, and no Lua filter errors.

Saturation without load: a threshold of 0 requests waiting is always reached (the engines report 0)."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.integration.test_hostile_balancing import assert_no_lua_errors
from tests.support.gateway import eventually
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

HEADER = "x-gateway-priority"
KEYS = {name: f"sk-{name}-hostile0123456789abcdef01234" for name in ("low", "default", "high")}
BODY = {"model": "busy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _doc(severe: float, auth: dict[str, Any] | None = None, reserve: int = 0) -> dict[str, Any]:
    extra: dict[str, Any] = {"limits": {"max_concurrent_requests": 8}}
    if reserve:
        extra["overload"] = {"reserve_for_high": reserve}
    doc = registry(model("busy", "vllm", [free_port()], **extra))
    doc["telemetry"] = {"interval_s": 0.3}
    doc["overload"] = {
        "priority_header": True,
        "saturated": {"queue_per_replica": 0},
        "severe": {"queue_per_replica": severe},
        "hold_s": 1,
    }
    if auth:
        doc["auth"] = auth
    return doc


def _outcome(client: httpx.Client, url: str, headers: Any) -> str:
    """'ok', 'shed' (the gateway's 503 model_overloaded with retry-after), or what else came back."""
    response = client.post(f"{url}/v1/chat/completions", json=BODY, headers=headers)
    if response.status_code == 200:
        return "ok"
    if response.status_code == 503:
        error = response.json()["error"]
        assert error["code"] == "model_overloaded" and response.headers["retry-after"] == "2", response.text
        return "shed"
    return f"{response.status_code} {response.text[:200]}"


def test_odd_priority_headers_without_keys(make_stack: StackFactory) -> None:
    """Level 2 (default and low shed) with a reserve for high: the header's value counts whatever its
    case; duplicated, empty or unknown values count as `default`."""
    stack = make_stack(_doc(severe=0, reserve=2))
    url = stack.envoys[0].url
    with httpx.Client(timeout=30) as client:
        eventually(lambda: _outcome(client, url, {}) == "shed", timeout_s=20, what="default shed")
        cases: list[tuple[str, Any, str]] = [
            ("high", {HEADER: "high"}, "ok"),
            ("HIGH", {HEADER: "HIGH"}, "ok"),
            ("High", {HEADER: "High"}, "ok"),
            ("low", {HEADER: "LOW"}, "shed"),
            ("empty", {HEADER: ""}, "shed"),
            ("garbage", {HEADER: "urgent!!"}, "shed"),
            ("7 KB", {HEADER: "h" * 7000}, "shed"),
            ("non-ASCII", {HEADER: "hïgh".encode()}, "shed"),
            ("two lines high+low", [(HEADER, "high"), (HEADER, "low")], "shed"),
            ("two lines high+high", [(HEADER, "high"), (HEADER, "high")], "shed"),
            ("comma list", {HEADER: "high,low"}, "shed"),
        ]
        for what, headers, expected in cases:
            assert _outcome(client, url, headers) == expected, what
        # Whatever its case, a `high` the filter lets through takes the high route (the reserve's
        # thresholds), not the other classes' (seen in the access log's route).
        ids = {value: str(uuid.uuid4()) for value in ("high", "HIGH", "hIgH")}
        for value, request_id in ids.items():
            assert _outcome(client, url, {HEADER: value, "x-request-id": request_id}) == "ok"
    log = stack.access_log_path(stack.envoys[0].node_id)

    def routes() -> dict[str, str]:
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return {e["request_id"]: e["route"] for e in entries if e["request_id"] in ids.values()}

    eventually(lambda: len(routes()) == len(ids), timeout_s=10, what="the requests in the access log")
    assert set(routes().values()) == {"high:busy"}, routes()
    assert_no_lua_errors(stack)


def test_clients_claiming_high_with_keys_on(make_stack: StackFactory) -> None:
    auth = {
        "mode": "api_key",
        "keys": [
            {"name": f"k-{name}", "sha256": hashlib.sha256(key.encode()).hexdigest(), "priority": name}
            for name, key in KEYS.items()
        ],
    }
    stack = make_stack(_doc(severe=0, auth=auth, reserve=2))
    url = stack.envoys[0].url

    def key(name: str, *extra: tuple[str, str | bytes]) -> list[tuple[str, str | bytes]]:
        return [("authorization", f"Bearer {KEYS[name]}"), *extra]

    with httpx.Client(timeout=30) as client:
        eventually(lambda: _outcome(client, url, key("default")) == "shed", timeout_s=20, what="default shed")
        cases: list[tuple[str, Any, str]] = [
            ("high key", key("high"), "ok"),
            ("high key, header LOW", key("high", (HEADER, "LOW")), "shed"),
            ("high key, header Default", key("high", (HEADER, "Default")), "shed"),
            ("high key, header empty", key("high", (HEADER, "")), "ok"),
            ("high key, header garbage", key("high", (HEADER, "x" * 4096)), "ok"),
            ("default key claims high", key("default", (HEADER, "high")), "shed"),
            ("default key claims HIGH", key("default", (HEADER, "HIGH")), "shed"),
            ("default key, two high lines", key("default", (HEADER, "high"), (HEADER, "high")), "shed"),
            ("low key claims high", key("low", (HEADER, "high")), "shed"),
            # A client writing the key check's own metadata header names: no effect.
            ("default key, spoofed key id", key("default", ("x-gateway-key-id", "k-high")), "shed"),
        ]
        for what, headers, expected in cases:
            assert _outcome(client, url, headers) == expected, what
        # No key at all, or a bad one: the 401 comes first, never a shed or a 5xx.
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": ""}):
            response = client.post(
                f"{url}/v1/chat/completions", json=BODY, headers={**headers, HEADER: "high"}
            )
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert_no_lua_errors(stack)
