"""The admin API: token, validation, live state, enable/disable, add/remove, drain, persistence."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from control_plane.config import EndpointConfig, ModelConfig
from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, chat, eventually, served_by
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

PROBES = {"interval_s": 0.2, "timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 1, "jitter": 0}


@pytest.fixture
def stack(make_stack: StackFactory) -> Any:
    return make_stack(
        {
            **registry(
                model("qwen2", "tgi", [free_port(), free_port()], aliases=["qwen"]),
                model("llama3", "vllm", [free_port()]),
            ),
            "health": PROBES,
        }
    )


def test_admin_needs_the_token(stack: Any) -> None:
    with httpx.Client(base_url=stack.admin_url, timeout=10) as anonymous:
        assert anonymous.get("/admin/models").status_code == 401
        wrong = anonymous.get("/admin/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "ADMIN_TOKEN" in wrong.json()["detail"]
        assert anonymous.post("/admin/models/qwen2/disable").status_code == 401
        assert anonymous.get("/healthz").status_code == 200  # open: probes and Prometheus use them
        assert anonymous.get("/metrics").status_code == 200


def test_bad_input_gets_422_naming_the_field(stack: Any) -> None:
    with admin_client(stack) as admin:
        bad = admin.post(
            "/admin/models", json={"id": "m", "engine": "tgi", "endpoints": [{"url": "http://h"}]}
        )
        assert bad.status_code == 422
        locations = [item["loc"] for item in bad.json()["detail"]]
        assert ["body", "endpoints", 0, "url"] in locations
        typo = admin.post("/admin/models/qwen2/endpoints", json={"url": "http://127.0.0.1:1", "wieght": 3})
        assert typo.status_code == 422 and typo.json()["detail"][0]["loc"] == ["body", "wieght"]
        assert admin.post("/admin/models/nope/disable").status_code == 404
        clash = admin.post("/admin/models", json={"id": "qwen", "engine": "vllm"})
        assert clash.status_code == 409 and "qwen" in clash.json()["detail"]


def test_models_and_endpoints_with_live_state(stack: Any) -> None:
    with admin_client(stack) as admin:
        eventually(lambda: admin.get("/admin/models/qwen2").json()["healthy_endpoints"] == 2, what="probes")
        models = admin.get("/admin/models").json()["models"]
        assert [m["id"] for m in models] == ["qwen2", "llama3"]
        qwen = admin.get("/admin/models/qwen").json()  # aliases work here too
        assert qwen["id"] == "qwen2" and qwen["engine"] == "tgi" and qwen["enabled"] is True
        first = qwen["endpoints"][0]
        assert {"id", "url", "health", "weight", "draining", "in_flight"} <= set(first)
        assert first["health"] == "healthy" and first["draining"] is False and first["weight"] >= 1
        assert first["in_flight"] == 0


def test_disable_and_enable(stack: Any) -> None:
    url = stack.envoys[0].url
    with admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        assert admin.post("/admin/models/llama3/disable").json()["enabled"] is False
        # The change is pushed before the call returns.
        denied = chat(client, url, "llama3")
        assert denied.status_code == 503 and denied.json()["error"]["code"] == "model_disabled"
        assert "llama3" in denied.json()["error"]["message"]
        assert [m["id"] for m in client.get(f"{url}/v1/models").json()["data"]] == ["qwen2"]
        assert admin.post("/admin/models/llama3/enable").json()["enabled"] is True
        assert chat(client, url, "llama3").status_code == 200


def test_add_and_remove_models_and_endpoints_at_run_time(stack: Any) -> None:
    url = stack.envoys[0].url
    new_port = free_port()
    with admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        created = admin.post(
            "/admin/models",
            json={"id": "mistral", "engine": "vllm", "endpoints": [{"url": f"http://127.0.0.1:{new_port}"}]},
        )
        assert created.status_code == 201, created.text
        assert created.json()["endpoints"][0]["id"] == "mistral-0" and created.json()["source"] == "admin"
        # Start the new endpoint's simulator (the registry file does not list it).
        new_model = ModelConfig(
            id="mistral", engine="vllm", endpoints=(EndpointConfig(url=f"http://127.0.0.1:{new_port}"),)
        )
        stack.start_simulator(new_model, 0)
        eventually(lambda: chat(client, url, "mistral").status_code == 200, what="the new model to route")

        extra = admin.post(
            "/admin/models/qwen2/endpoints", json={"id": "qwen2-extra", "url": f"http://127.0.0.1:{new_port}"}
        )
        assert extra.status_code == 201 and extra.json()["model"] == "qwen2"
        removed = admin.delete("/admin/endpoints/qwen2-extra")
        assert removed.status_code == 200 and removed.json()["removed"] == "qwen2-extra"
        assert removed.json()["sync"]["applied_to"] == [stack.envoys[0].node_id]
        assert admin.get("/admin/endpoints/qwen2-extra").status_code == 404

        assert admin.delete("/admin/endpoints/qwen2-0").status_code == 200  # a file-defined one
        eventually(
            lambda: {served_by(chat(client, url, "qwen2")) for _ in range(10)} == {"qwen2-1"},
            what="the removed endpoint to leave Envoy",
        )
        assert admin.delete("/admin/models/mistral").status_code == 200
        gone = chat(client, url, "mistral")
        assert gone.status_code == 404, gone.text


def test_admin_state_survives_a_control_plane_restart(stack: Any) -> None:
    with admin_client(stack) as admin:
        admin.post("/admin/models/llama3/disable").raise_for_status()
        admin.post("/admin/endpoints/qwen2-1/drain").raise_for_status()
        admin.post("/admin/models", json={"id": "extra", "engine": "tgi"}).raise_for_status()
        before = {
            m["id"]: (m["enabled"], [(e["id"], e["draining"]) for e in m["endpoints"]])
            for m in admin.get("/admin/models").json()["models"]
        }
    stack.stop_control_plane()
    stack.start_control_plane()
    with admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        after = {
            m["id"]: (m["enabled"], [(e["id"], e["draining"]) for e in m["endpoints"]])
            for m in admin.get("/admin/models").json()["models"]
        }
        assert after == before
        assert after["llama3"][0] is False and ("qwen2-1", True) in after["qwen2"][1]
        # And the restarted control plane pushed it: Envoy agrees.
        eventually(lambda: chat(client, stack.envoys[0].url, "llama3").status_code == 503, what="resync")
        assert {served_by(chat(client, stack.envoys[0].url, "qwen2")) for _ in range(10)} == {"qwen2-0"}


def test_drain_lets_five_streams_finish_and_reports_done(make_stack: StackFactory) -> None:
    stack = make_stack(
        {**registry(model("qwen2", "tgi", [free_port(), free_port()])), "health": PROBES},
        sim_extra_args={"qwen2-0": ["--decode-ms-per-token", "100"]},
    )
    url = stack.envoys[0].url
    tokens = 25
    with admin_client(stack) as admin, httpx.Client(timeout=30) as client:
        # Put all five streams on qwen2-0: drain qwen2-1 first, then swap.
        admin.post("/admin/endpoints/qwen2-1/drain").raise_for_status()
        results: list[dict[str, Any]] = []

        def stream() -> None:
            body = {
                "model": "qwen2",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": tokens,
                "stream": True,
            }
            text, done, who = [], False, ""
            with (
                httpx.Client(timeout=30) as own,
                own.stream("POST", f"{url}/v1/chat/completions", json=body) as r,
            ):
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        who = chunk.get("system_fingerprint", who)
                        text += [c["delta"].get("content") or "" for c in chunk["choices"]]
            results.append(
                {"status": r.status_code, "done": done, "tokens": len("".join(text).split()), "who": who}
            )

        threads = [threading.Thread(target=stream) for _ in range(5)]
        for thread in threads:
            thread.start()
        eventually(
            lambda: (admin.get("/admin/endpoints/qwen2-0").json()["in_flight"] or 0) == 5,
            what="five streams in flight on qwen2-0",
        )
        admin.post("/admin/endpoints/qwen2-1/undrain").raise_for_status()
        drained = admin.post("/admin/endpoints/qwen2-0/drain").json()
        assert drained["draining"] is True and drained["drained"] is False

        # New requests avoid the draining endpoint while its streams go on.
        assert {served_by(chat(client, url, "qwen2")) for _ in range(10)} == {"qwen2-1"}
        assert admin.get("/admin/endpoints/qwen2-0").json()["drained"] is False

        for thread in threads:
            thread.join(timeout=30)
        assert len(results) == 5
        assert all(r == {"status": 200, "done": True, "tokens": tokens, "who": "qwen2-0"} for r in results), (
            results
        )
        eventually(
            lambda: admin.get("/admin/endpoints/qwen2-0").json()["drained"] is True,
            timeout_s=5,
            what="the drain to report done",
        )
        assert admin.get("/admin/endpoints/qwen2-0").json()["in_flight"] == 0

        # Draining a whole model: new requests get a 503 naming it; undrain brings it back.
        assert admin.post("/admin/models/qwen2/drain").json()["draining"] is True
        refused = chat(client, url, "qwen2")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_draining"
        eventually(lambda: admin.get("/admin/models/qwen2").json()["drained"] is True, what="model drained")
        admin.post("/admin/models/qwen2/undrain").raise_for_status()
        admin.post("/admin/endpoints/qwen2-0/undrain").raise_for_status()
        eventually(
            lambda: {served_by(chat(client, url, "qwen2")) for _ in range(10)} == {"qwen2-0", "qwen2-1"},
            what="both endpoints back",
        )


BAD_NAMES = ["bad\n", "bad\r", "b\tad", "bad\x00", "ba\nd"]


def test_bad_names_are_refused_422_and_routing_still_works(stack: Any) -> None:
    url = stack.envoys[0].url
    port = free_port()
    with admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        for name in BAD_NAMES:
            for body in (
                {"id": name, "engine": "tgi"},
                {"id": "ok-model", "aliases": [name], "engine": "tgi"},
                {
                    "id": "ok-model",
                    "engine": "tgi",
                    "endpoints": [{"id": name, "url": f"http://127.0.0.1:{port}"}],
                },
                {"id": "ok-model", "engine": "tgi", "owned_by": name},
            ):
                refused = admin.post("/admin/models", json=body)
                assert refused.status_code == 422, (body, refused.text)
            endpoint = admin.post(
                "/admin/models/qwen2/endpoints", json={"id": name, "url": f"http://127.0.0.1:{port}"}
            )
            assert endpoint.status_code == 422, endpoint.text
            # Path parameters: refused before any lookup, never a 500 or a 404 from a lookup.
            quoted = (
                name.replace("\n", "%0A").replace("\r", "%0D").replace("\t", "%09").replace("\x00", "%00")
            )
            for method, path in (
                ("GET", f"/admin/models/{quoted}"),
                ("POST", f"/admin/models/{quoted}/disable"),
                ("DELETE", f"/admin/models/{quoted}"),
                ("GET", f"/admin/endpoints/{quoted}"),
                ("POST", f"/admin/endpoints/{quoted}/drain"),
                ("DELETE", f"/admin/endpoints/{quoted}"),
            ):
                answer = admin.request(method, path)
                assert answer.status_code == 422, (method, path, answer.text)
                assert "not a valid" in answer.json()["detail"]
        # Nothing was stored, and every later write works and reaches Envoy.
        assert [m["id"] for m in admin.get("/admin/models").json()["models"]] == ["qwen2", "llama3"]
        assert not [e for e in admin.get("/admin/audit").json()["entries"] if e["action"] == "model.add"]
        assert admin.post("/admin/models/llama3/disable").json()["enabled"] is False
        assert chat(client, url, "llama3").status_code == 503
        assert admin.post("/admin/models/llama3/enable").status_code == 200
        assert {chat(client, url, "qwen2").status_code for _ in range(16)} == {200}
        assert chat(client, url, "llama3").status_code == 200


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"name": "elsewhere"}, "cluster_overrides.name"),
        ({"eds_cluster_config": {"service_name": "x"}}, "cluster_overrides.eds_cluster_config"),
        ({"type": "STATIC"}, "cluster_overrides.type"),
        ({"type": "LOGICAL_DNS"}, "cluster_overrides.type"),
        ({"outlier_detection": {"max_ejection_percent": 500}}, "Envoy refuses the cluster"),
    ],
)
def test_a_bad_cluster_override_is_refused_stores_nothing_and_blocks_nothing(
    stack: Any, overrides: dict[str, Any], reason: str
) -> None:
    url = stack.envoys[0].url
    with admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        audit = admin.get("/admin/audit").json()["entries"]
        bad = admin.post("/admin/models", json={"id": "bad", "engine": "tgi", "cluster_overrides": overrides})
        assert bad.status_code == 422, bad.text
        assert reason in json.dumps(bad.json()["detail"])
        assert admin.get("/admin/models/bad").status_code == 404
        assert admin.get("/admin/audit").json()["entries"] == audit
        # Later writes are applied at once, a valid new model included.
        port = free_port()
        added = admin.post(
            "/admin/models",
            json={"id": "good", "engine": "vllm", "endpoints": [{"url": f"http://127.0.0.1:{port}"}]},
        )
        assert added.status_code == 201, added.text
        assert added.json()["sync"] == {
            "applied_to": [stack.envoys[0].node_id],
            "lagging": [],
            "rejected": {},
            "warning": None,
        }
        stack.start_simulator(
            ModelConfig(
                id="good", engine="vllm", endpoints=(EndpointConfig(url=f"http://127.0.0.1:{port}"),)
            ),
            0,
        )
        eventually(lambda: chat(client, url, "good").status_code == 200, what="the valid model to route")
        assert admin.delete("/admin/models/good").status_code == 200
        assert chat(client, url, "good").status_code == 404
    # And after a restart, the control plane serves as before.
    stack.stop_control_plane()
    stack.start_control_plane()
    with admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        assert [m["id"] for m in admin.get("/admin/models").json()["models"]] == ["qwen2", "llama3"]
        assert chat(client, url, "qwen2").status_code == 200


def test_a_change_while_no_envoy_is_connected_says_so(stack: Any) -> None:
    stack.envoys[0].process.stop()
    with admin_client(stack) as admin:

        def disconnected() -> bool:
            return admin.get("/admin/status").json()["envoys"] == []

        eventually(disconnected, what="the Envoy to disconnect")
        answer = admin.post("/admin/models/llama3/disable")
        assert answer.status_code == 200
        assert answer.json()["sync"]["applied_to"] == []
        assert "no Envoy is connected" in answer.json()["sync"]["warning"]
