"""A real Prometheus and Alertmanager around the local stack: every target up, per-model series with the
labels the rules need, rules that evaluate cleanly, and EndpointDown going from a stopped model server to
the control plane's webhook and back (resolved)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from control_plane.config.loader import parse_registry
from control_plane.devstack.observability import (
    NotInstalled,
    ObservabilityNotInstalled,
    ObservabilityStack,
    find_binaries,
)
from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack
from control_plane.observability.render import RULES_FILE, Timings
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, chat, eventually
from tests.support.registries import model, registry

pytestmark = pytest.mark.integration

_found = find_binaries()
needs_binaries = pytest.mark.skipif(isinstance(_found, NotInstalled), reason=str(_found))

ObservabilityFactory = Callable[..., ObservabilityStack]


@pytest.fixture
def observability() -> Iterator[ObservabilityFactory]:
    """ObservabilityStacks on free ports with 1 s scrapes and evaluations; stopped afterwards."""
    started: list[ObservabilityStack] = []

    def make(stack: LocalStack, *, write_targets: bool = True, **kwargs: Any) -> ObservabilityStack:
        # In the stack's work dir: its logs land in logs/, which make_stack prints when a test fails.
        obs = ObservabilityStack(
            stack.settings.work_dir,
            prometheus_port=0,
            alertmanager_port=0,
            timings=Timings.fast(),
            **kwargs,
        )
        started.append(obs)
        obs.start(
            [envoy.admin_url for envoy in stack.envoys],
            stack.admin_url,
            stack.settings.admin_token,
            stack.registry(),
            write_targets=write_targets,
        )
        return obs

    yield make
    for obs in started:
        obs.stop()


def query(client: httpx.Client, obs: ObservabilityStack, expr: str) -> list[dict[str, Any]]:
    response = client.get(f"{obs.prometheus_url}/api/v1/query", params={"query": expr})
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def active_targets(client: httpx.Client, obs: ObservabilityStack) -> list[dict[str, Any]]:
    response = client.get(f"{obs.prometheus_url}/api/v1/targets", params={"state": "active"})
    response.raise_for_status()
    targets: list[dict[str, Any]] = response.json()["data"]["activeTargets"]
    return targets


def three_models() -> dict[str, Any]:
    """The seeds' two models, plus one whose id Envoy's cluster name has to sanitise ('.')."""
    return registry(
        model("qwen2", "tgi", [free_port(), free_port()], aliases=["qwen"]),
        model("llama3", "vllm", [free_port(), free_port()]),
        model("qwen2.5", "vllm", [free_port()]),
    )


@needs_binaries
def test_every_part_is_scraped_with_model_labels(
    make_stack: StackFactory, observability: ObservabilityFactory
) -> None:
    doc = three_models()
    stack = make_stack(doc)
    obs = observability(stack)
    assert obs.rules_path == RULES_FILE  # the repository's rules, as they are
    client = httpx.Client(timeout=10)
    gateway = stack.envoys[0].url

    expected_jobs = {"envoy": 1, "control-plane": 1, "backends": 5, "prometheus": 1, "alertmanager": 1}

    def all_up() -> bool:
        targets = active_targets(client, obs)
        counts: dict[str, int] = {}
        for target in targets:
            if target["health"] == "up":
                job = target["labels"]["job"]
                counts[job] = counts.get(job, 0) + 1
        return counts == expected_jobs

    eventually(all_up, timeout_s=30, what=f"every target up: {expected_jobs}")

    backends = {
        t["labels"]["endpoint"]: t["labels"]
        for t in active_targets(client, obs)
        if t["labels"]["job"] == "backends"
    }
    assert backends["llama3-1"]["model"] == "llama3"
    assert backends["llama3-1"]["engine"] == "vllm"
    assert backends["qwen2.5-0"]["model"] == "qwen2.5"

    def traffic_seen() -> bool:
        for name in ("qwen2", "llama3", "qwen2.5"):
            assert chat(client, gateway, name).status_code == 200
        return all(
            query(client, obs, f'model:llm_gateway_requests:rate1m{{model="{name}"}} > 0')
            for name in ("qwen2", "llama3", "qwen2.5")
        )

    eventually(traffic_seen, timeout_s=30, what="per-model request rates from Envoy's stats")

    # Envoy's cluster stats carry the exact model id, also for an id its cluster name had to sanitise.
    for name in ("qwen2", "llama3", "qwen2.5"):
        series = query(client, obs, f'envoy_cluster_upstream_rq_total{{job="envoy", model="{name}"}}')
        assert series and float(series[0]["value"][1]) > 0, name
    assert not query(client, obs, 'envoy_cluster_upstream_rq_total{model=~"qwen2_5.*"}')
    assert not query(
        client, obs, 'envoy_cluster_upstream_rq_total{envoy_cluster_name="xds_cluster", model!=""}'
    )

    # Engine metrics with model / endpoint / engine from file SD.
    running = query(client, obs, 'vllm:num_requests_running{job="backends", model="llama3"}')
    assert {s["metric"]["endpoint"] for s in running} == {"llama3-0", "llama3-1"}
    assert {s["metric"]["engine"] for s in running} == {"vllm"}
    assert {s["metric"]["endpoint"] for s in query(client, obs, 'tgi_queue_size{model="qwen2"}')} == {
        "qwen2-0",
        "qwen2-1",
    }
    gpu = query(client, obs, 'model_endpoint_gpu:llm_gateway_gpu_memory_used:ratio{model="llama3"}')
    assert {s["metric"]["endpoint"] for s in gpu} == {"llama3-0", "llama3-1"}
    assert all(0 < float(s["value"][1]) < 1 for s in gpu)

    # The control plane's own metrics.
    healthy = query(client, obs, 'llm_gateway_endpoint_healthy{job="control-plane"}')
    assert {(s["metric"]["model"], s["metric"]["endpoint"]) for s in healthy} == {
        ("qwen2", "qwen2-0"),
        ("qwen2", "qwen2-1"),
        ("llama3", "llama3-0"),
        ("llama3", "llama3-1"),
        ("qwen2.5", "qwen2.5-0"),
    }
    assert query(client, obs, "llm_gateway_xds_connected_envoys == 1")

    eventually(
        lambda: (
            bool(query(client, obs, 'model:llm_gateway_generation_tokens:rate1m{model="llama3"} > 0'))
            and bool(query(client, obs, 'model:llm_gateway_generation_tokens:rate1m{model="qwen2"} > 0'))
        ),
        timeout_s=15,
        what="tokens per second from vLLM counters and TGI histogram sums",
    )

    # Every rule loaded and evaluates without error (e.g. no many-to-many matches on real series), and
    # nothing fires on a healthy stack.
    rules = client.get(f"{obs.prometheus_url}/api/v1/rules").json()["data"]["groups"]
    assert {g["name"] for g in rules} == {
        "llm_gateway_requests",
        "llm_gateway_backends",
        "llm_gateway_alerts",
    }
    for group in rules:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            if rule["type"] == "alerting":
                assert rule["state"] == "inactive", (rule["name"], rule["alerts"])

    # A registry change reaches Prometheus through the file-SD file: the dropped model's targets go.
    smaller = parse_registry({"models": [m for m in doc["models"] if m["id"] != "llama3"]}, "smaller")
    assert obs.update_targets(smaller) is True
    eventually(
        lambda: sum(1 for t in active_targets(client, obs) if t["labels"]["job"] == "backends") == 3,
        timeout_s=20,
        what="llama3's targets to leave Prometheus",
    )


@needs_binaries
def test_endpoint_down_fires_reaches_the_webhook_drains_and_resolves(
    make_stack: StackFactory, observability: ObservabilityFactory, tmp_path: Path
) -> None:
    doc = registry(model("qwen2", "tgi", [free_port(), free_port()]))
    doc["alerting"] = {"auto_drain": ["EndpointDown"]}  # the operator allows this alert to drain
    doc["health"] = {"interval_s": 0.5, "timeout_s": 0.5}
    stack = make_stack(doc)
    # The control plane writes the file-SD targets into the directory this Prometheus watches.
    obs = observability(stack, for_s=1, write_targets=False)
    assert obs.rules_path != RULES_FILE
    assert yaml.safe_load(obs.rules_path.read_text())["groups"][2]["rules"][0]["for"] == "1s"
    client = httpx.Client(timeout=10)
    admin = admin_client(stack)

    def targets_up() -> bool:
        targets = active_targets(client, obs)
        return len(targets) == 6 and all(t["health"] == "up" for t in targets)

    eventually(targets_up, timeout_s=30, what="every target up")

    stack.simulators["qwen2-1"].stop()

    def alertmanager_alerts() -> list[dict[str, Any]]:
        response = client.get(
            f"{obs.alertmanager_url}/api/v2/alerts", params={"filter": 'alertname="EndpointDown"'}
        )
        response.raise_for_status()
        alerts: list[dict[str, Any]] = response.json()
        return alerts

    eventually(
        lambda: any(
            a["labels"].get("endpoint") == "qwen2-1" and a["labels"].get("model") == "qwen2"
            for a in alertmanager_alerts()
        ),
        timeout_s=30,
        what="EndpointDown{endpoint=qwen2-1} in Alertmanager",
    )
    assert all(a["labels"]["endpoint"] == "qwen2-1" for a in alertmanager_alerts())

    def notified(status: str) -> bool:
        response = admin.get("/admin/alerts")
        response.raise_for_status()
        return any(
            n["alertname"] == "EndpointDown"
            and n["status"] == status
            and n["labels"].get("endpoint") == "qwen2-1"
            for n in response.json()["notifications"]
        )

    eventually(lambda: notified("firing"), timeout_s=20, what="the webhook to receive EndpointDown firing")

    # The automatic action: the endpoint is drained, and says by whom.
    def endpoint() -> dict[str, Any]:
        response = admin.get("/admin/endpoints/qwen2-1")
        response.raise_for_status()
        return dict(response.json())

    eventually(lambda: endpoint()["draining"], timeout_s=10, what="the automatic drain")
    alerts = admin.get("/admin/alerts").json()
    assert {"endpoint": "qwen2-1", "alertname": "EndpointDown"}.items() <= alerts["pending_undrains"][
        0
    ].items()
    assert any(n["action"] == "drained qwen2-1" for n in alerts["notifications"])
    assert any(
        e["action"] == "auto.drain" and e["target"] == "qwen2-1"
        for e in admin.get("/admin/audit").json()["entries"]
    )
    # Its own drain does not resolve the alert: it stays firing while the server is down.
    assert any(a["labels"].get("endpoint") == "qwen2-1" for a in alertmanager_alerts())

    qwen2 = stack.registry().model("qwen2")
    assert qwen2 is not None
    stack.start_simulator(qwen2, 1)
    eventually(
        lambda: notified("resolved"), timeout_s=40, what="the webhook to receive EndpointDown resolved"
    )
    # The resolve undoes it.
    eventually(lambda: not endpoint()["draining"], timeout_s=10, what="the automatic undrain")
    assert admin.get("/admin/alerts").json()["pending_undrains"] == []


def test_missing_binaries_are_reported_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_BIN", str(tmp_path / "no-prometheus"))
    found = find_binaries()
    assert isinstance(found, NotInstalled)
    assert found.missing == ("prometheus",)
    assert "apt-get install prometheus prometheus-alertmanager" in str(found)
    with pytest.raises(ObservabilityNotInstalled, match="apt-get install prometheus prometheus-alertmanager"):
        ObservabilityStack(tmp_path).start([], "http://127.0.0.1:1", "token")


@needs_binaries
def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        obs = ObservabilityStack(tmp_path, prometheus_port=port, alertmanager_port=0)
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}: the port is in use"):
            obs.start(["http://127.0.0.1:1"], "http://127.0.0.1:2", "token")
    assert obs.processes == []
