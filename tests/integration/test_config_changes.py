"""Config edits reach a running Envoy without restarting it; bad edits and rejected pushes change nothing."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
import yaml

from control_plane.devstack.procs import free_port
from tests.integration.conftest import StackFactory, write_config
from tests.support.gateway import (
    admin_client,
    chat,
    envoy_cluster_hosts,
    eventually,
    prometheus_value,
    served_by,
)
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration


def served_set(client: httpx.Client, url: str, model_id: str, n: int = 16) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        response = chat(client, url, model_id)
        seen[served_by(response) if response.status_code == 200 else str(response.status_code)] += 1
    return seen


def envoy_server_stat(client: httpx.Client, admin_url: str, name: str) -> int:
    return int(client.get(f"{admin_url}/stats", params={"filter": f"^server\\.{name}$"}).text.split(": ")[1])


def test_add_remove_endpoints_and_add_a_model_live(make_stack: StackFactory) -> None:
    p0, p1, p2 = free_port(), free_port(), free_port()
    qwen = model("qwen2", "tgi", [p0])
    stack = make_stack(registry(qwen))
    envoy = stack.envoys[0]
    pid = envoy.process.pid
    with httpx.Client(timeout=10) as client:
        assert set(served_set(client, envoy.url, "qwen2")) == {"qwen2-0"}

        # Add an endpoint: its simulator starts, Envoy gets it over EDS and balances onto it.
        grown = model("qwen2", "tgi", [p0, p1])
        write_config(stack, registry(grown))
        stack.start_simulators()
        eventually(
            lambda: set(served_set(client, envoy.url, "qwen2")) == {"qwen2-0", "qwen2-1"},
            what="traffic on both endpoints",
        )

        # Remove the first endpoint: no request reaches it any more.
        shrunk = registry({**grown, "endpoints": grown["endpoints"][1:]})
        write_config(stack, shrunk)
        eventually(
            lambda: envoy_cluster_hosts(client, envoy.admin_url, "model_qwen2") == {f"127.0.0.1:{p1}"},
            what="Envoy to drop the removed endpoint",
        )
        assert set(served_set(client, envoy.url, "qwen2", n=30)) == {"qwen2-1"}

        # Add a model.
        write_config(stack, registry(shrunk["models"][0], model("llama3", "vllm", [p2])))
        stack.start_simulators()
        eventually(
            lambda: chat(client, envoy.url, "llama3").status_code == 200, what="the new model to route"
        )
        ids = [m["id"] for m in client.get(f"{envoy.url}/v1/models").json()["data"]]
        assert ids == ["qwen2", "llama3"]

        # The same Envoy process did all of it: no restart, no hot restart.
        assert envoy.process.pid == pid and envoy.process.alive()
        assert envoy_server_stat(client, envoy.admin_url, "hot_restart_epoch") == 0


def test_a_bad_edit_is_refused_and_the_last_good_config_stays_live(make_stack: StackFactory) -> None:
    stack = make_stack(registry(model("qwen2", "tgi", [free_port()])))
    url = stack.envoys[0].url
    with httpx.Client(timeout=10) as client:
        stack.settings.config_path.write_text(
            "models:\n  - id: qwen2\n    engine: tgi\n    endpoints: [{url: nope}]\n"
        )
        eventually(
            lambda: (
                prometheus_value(
                    client, f"{stack.admin_url}/metrics", "llm_gateway_config_reloads_total", result="failure"
                )
                >= 1
            ),
            what="the reload failure to be counted",
        )
        with admin_client(stack) as admin:
            status = admin.get("/admin/status").json()
        assert "models[0].endpoints[0].url" in status["config_error"]
        assert chat(client, url, "qwen2").status_code == 200
        assert [m["id"] for m in status["models"]] == ["qwen2"]


def test_a_config_envoy_rejects_is_nacked_and_envoy_keeps_the_last_good_one(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the check before the push (GATEWAY_ENVOY_VALIDATE=off, as for a control plane with no
    # Envoy binary), the live Envoy's NACK is what refuses the change: rolled back, reported.
    monkeypatch.setenv("GATEWAY_ENVOY_VALIDATE", "off")
    port = free_port()
    good = registry(model("qwen2", "tgi", [port]))
    stack = make_stack(good)
    envoy = stack.envoys[0]
    metrics = f"{stack.admin_url}/metrics"
    with httpx.Client(timeout=10) as client:
        # Valid for the registry schema (a real Cluster field), invalid for Envoy (a percentage over 100).
        bad = registry(
            model(
                "qwen2",
                "tgi",
                [port],
                cluster_overrides={"outlier_detection": {"max_ejection_percent": 500}},
                limits={"max_concurrent_requests": 7},
            )
        )
        write_config(stack, bad)
        eventually(
            lambda: prometheus_value(client, metrics, "llm_gateway_xds_nacks_total", type="cds") >= 1,
            what="Envoy's NACK to be counted",
        )
        pushes = prometheus_value(client, metrics, "llm_gateway_xds_pushes_total", type="cds")
        import time

        time.sleep(2)
        # Not re-pushed in a loop, and Envoy serves on with the previous cluster settings.
        assert prometheus_value(client, metrics, "llm_gateway_xds_pushes_total", type="cds") == pushes
        assert prometheus_value(client, metrics, "llm_gateway_xds_nacks_total", type="cds") == 1
        assert chat(client, envoy.url, "qwen2").status_code == 200
        dump = client.get(
            f"{envoy.admin_url}/config_dump", params={"resource": "dynamic_active_clusters"}
        ).json()
        clusters = {c["cluster"]["name"]: c["cluster"] for c in dump["configs"]}
        assert clusters["model_qwen2"]["outlier_detection"]["max_ejection_percent"] == 50
        assert clusters["model_qwen2"]["circuit_breakers"]["thresholds"][0]["max_requests"] == 256
        with admin_client(stack) as admin:
            status = admin.get("/admin/status").json()
        assert "rejected the change (rolled back)" in status["config_error"]
        assert "MaxEjectionPercent" in status["config_error"]
        assert status["envoys"][0]["last_rejected"]["cds"]["message"]

        # The fixed config goes through.
        write_config(stack, registry(model("qwen2", "tgi", [port], limits={"max_concurrent_requests": 7})))

        def applied() -> bool:
            dump = client.get(
                f"{envoy.admin_url}/config_dump", params={"resource": "dynamic_active_clusters"}
            ).json()
            cluster = {c["cluster"]["name"]: c["cluster"] for c in dump["configs"]}["model_qwen2"]
            return bool(cluster["circuit_breakers"]["thresholds"][0]["max_requests"] == 7)

        eventually(applied, what="the corrected config to be applied")


def test_envoy_serves_without_the_control_plane_and_resyncs_when_it_returns(
    make_stack: StackFactory, two_models: dict[str, Any]
) -> None:
    only_qwen = registry(two_models["models"][0])
    stack = make_stack(only_qwen)
    envoy = stack.envoys[0]
    with httpx.Client(timeout=10) as client:
        stack.stop_control_plane()
        for _ in range(20):
            assert chat(client, envoy.url, "qwen2").status_code == 200
        # While it is down the registry changes; the restarted control plane brings Envoy up to date.
        write_config(stack, two_models)
        stack.start_simulators()
        stack.start_control_plane()
        eventually(lambda: chat(client, envoy.url, "llama3").status_code == 200, what="Envoy to resync")
        assert chat(client, envoy.url, "qwen2").status_code == 200


def test_several_envoys_get_the_same_config(make_stack: StackFactory) -> None:
    p0, p1 = free_port(), free_port()
    stack = make_stack(registry(model("qwen2", "tgi", [p0])))
    second = stack.start_envoy(node_id="gateway-1")
    with httpx.Client(timeout=10) as client:
        for envoy in stack.envoys:
            assert chat(client, envoy.url, "qwen2").status_code == 200
        assert prometheus_value(client, f"{stack.admin_url}/metrics", "llm_gateway_xds_connected_envoys") == 2
        write_config(stack, registry(model("qwen2", "tgi", [p0]), model("llama3", "vllm", [p1])))
        stack.start_simulators()
        for envoy in (stack.envoys[0], second):
            eventually(
                lambda e=envoy: chat(client, e.url, "llama3").status_code == 200,  # type: ignore[misc]
                what=f"{envoy.node_id} to get the new model",
            )


def reload_results(client: httpx.Client, stack: Any, result: str) -> float:
    return prometheus_value(
        client, f"{stack.admin_url}/metrics", "llm_gateway_config_reloads_total", result=result
    )


def test_empty_undecodable_and_unservable_files_are_refused_and_watching_goes_on(
    make_stack: StackFactory,
) -> None:
    port = free_port()
    good = registry(model("qwen2", "tgi", [port]))
    stack = make_stack(good)
    url, path = stack.envoys[0].url, stack.settings.config_path
    valid_bytes = path.read_bytes()
    bad_files: list[tuple[bytes, str]] = [
        (b"", "the document is empty"),
        (b"# nothing but a comment\n", "the document is empty"),
        (b"models: []\n", "models: no model is defined"),
        (b"gateway: {expose_upstream_host: true}\nmodels: []\n", "models: no model is defined"),
        (b"# caf\xe9\n" + valid_bytes, "line 1, column 6: byte 0xe9 is not UTF-8"),
        (
            yaml.safe_dump(
                registry(model("qwen2", "tgi", [port], cluster_overrides={"type": "STATIC"}))
            ).encode(),
            "cluster_overrides.type: set by the gateway",
        ),
        (
            yaml.safe_dump(
                registry(
                    model(
                        "qwen2", "tgi", [port], cluster_overrides={"outlier_detection": {"interval": "-1s"}}
                    )
                )
            ).encode(),
            "Envoy refuses the cluster",
        ),
        (yaml.safe_dump(registry(model("qwen2\n", "tgi", [port]))).encode(), "models[0].id"),
    ]
    with httpx.Client(timeout=10) as client, admin_client(stack) as admin:
        for count, (content, reason) in enumerate(bad_files, start=1):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(content)
            tmp.replace(path)
            eventually(
                lambda n=count: reload_results(client, stack, "failure") >= n,  # type: ignore[misc]
                what=f"the refusal of a file with {reason!r}",
            )
            error = admin.get("/admin/status").json()["config_error"]
            assert reason in error, error
            # Routing never stopped: 16 requests, all answered by the last good config.
            assert {chat(client, url, "qwen2").status_code for _ in range(16)} == {200}
        assert reload_results(client, stack, "error") == 0
        assert (
            prometheus_value(client, f"{stack.admin_url}/metrics", "llm_gateway_xds_nacks_total", type="cds")
            == 0
        )

        # The watcher is alive: the next valid file goes through (a new model).
        write_config(stack, registry(model("qwen2", "tgi", [port]), model("llama3", "vllm", [free_port()])))
        stack.start_simulators()
        eventually(lambda: chat(client, url, "llama3").status_code == 200, what="the next valid file")
        assert admin.get("/admin/status").json()["config_error"] is None


def test_an_empty_file_is_served_when_it_says_allow_empty(make_stack: StackFactory) -> None:
    stack = make_stack(registry(model("qwen2", "tgi", [free_port()])))
    with httpx.Client(timeout=10) as client:
        write_config(stack, {"allow_empty": True, "models": []})
        eventually(lambda: chat(client, stack.envoys[0].url, "qwen2").status_code == 404, what="forced empty")
