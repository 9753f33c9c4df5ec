"""Discovered models whose names hold dots (`Qwen2.5-0.5B-Instruct/`, `llama-3.1-8b.Q4_K_M.gguf`), end to
end through the real Envoy, control plane and simulated engines: found with their ids, listed in
/v1/models, loaded and answered through Envoy by their id (and by the folder's own spelling), and labelled
with their id in the control plane's metrics, in Envoy's stats (a cluster name without dots, so Envoy's
tag extraction keeps it whole) and, with a real Prometheus, in the `model` label of Envoy's series."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.devstack.observability import NotInstalled, ObservabilityStack, find_binaries
from control_plane.observability.render import Timings
from control_plane.xds.resources import cluster_name
from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, eventually, prometheus_value
from tests.unit.control_plane.lifecycle.test_discovery import gguf, model_kvs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
QWEN_DIR, GGUF_FILE = "Qwen2.5-0.5B-Instruct", "llama-3.1-8b.Q4_K_M.gguf"
QWEN, LLAMA = "qwen2.5-0.5b-instruct", "llama-3.1-8b.q4_k_m"


def _doc(tmp_path: Path) -> dict[str, Any]:
    models = tmp_path / "models"
    (models / QWEN_DIR).mkdir(parents=True)
    shutil.copy(REPO / "deploy/models-sim/qwen2-0.5b-instruct/config.json", models / QWEN_DIR)
    (models / GGUF_FILE).write_bytes(gguf(model_kvs("llama", "Llama 3.1 8B")) + b"\0" * 4096)
    # The simulator serves both (a GGUF file is served by llama.cpp unless the directory says simulator).
    lifecycle = {"model_dirs": [{"path": str(models), "launcher": "simulator"}], "scan_interval_s": 3600}
    return {"gateway": {"expose_upstream_host": True}, "lifecycle": lifecycle, "models": []}


def _chat(url: str, model_id: str) -> httpx.Response:
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_dotted_model_names_are_found_routed_and_labelled(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = make_stack(_doc(tmp_path))
    url, envoy_admin = stack.envoys[0].url, stack.envoys[0].admin_url
    with admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        found = {d["id"]: d for d in admin.get("/admin/lifecycle").json()["discovered"]}
        assert found[QWEN]["kind"] == "chat" and found[LLAMA]["kind"] == "chat", found
        listed = {m["id"] for m in client.get(f"{url}/v1/models").json()["data"]}
        assert {QWEN, LLAMA} <= listed

        for model_id in (QWEN, LLAMA):
            answer = _chat(url, model_id)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == model_id
            assert admin.get(f"/admin/models/{model_id}").json()["state"] == "ready"
        # The folder's own spelling is an alias of the (lower-cased) id.
        by_name = _chat(url, QWEN_DIR)
        assert by_name.status_code == 200, by_name.text
        assert _chat(url, GGUF_FILE.removesuffix(".gguf")).status_code == 200

        # The control plane's metrics carry the id whole.
        metrics = f"{stack.admin_url}/metrics"
        # (The lifecycle gauges are exported on the manager's tick: wait for the next one.)
        for model_id in (QWEN, LLAMA):
            eventually(
                lambda model_id=model_id: prometheus_value(  # type: ignore[misc]
                    client, metrics, "llm_gateway_model_replicas", model=model_id, state="ready"
                )
                == 1,
                what=f"{model_id} counted ready",
            )
        # Envoy's stats: one cluster per model, its name without dots, its requests counted.
        stats = client.get(f"{envoy_admin}/stats/prometheus").text
        for model_id in (QWEN, LLAMA):
            name = cluster_name(model_id)
            assert "." not in name
            sent = prometheus_value(
                client,
                f"{envoy_admin}/stats/prometheus",
                "envoy_cluster_upstream_rq_total",
                envoy_cluster_name=name,
            )
            assert sent >= 1, (
                model_id,
                name,
                [line for line in stats.splitlines() if "upstream_rq_total" in line],
            )

        if isinstance(find_binaries(), NotInstalled):
            return
        # A real Prometheus, started as `make run` starts it (no registry at hand): the `model` label of
        # Envoy's series is the id, for models found after it started too.
        obs = ObservabilityStack(
            stack.settings.work_dir, prometheus_port=0, alertmanager_port=0, timings=Timings.fast()
        )
        try:
            obs.start(
                [e.admin_url for e in stack.envoys],
                stack.admin_url,
                stack.settings.admin_token,
                write_targets=False,
            )
            obs.follow_models(stack.admin_url, stack.settings.admin_token)

            def labelled() -> set[str]:
                response = client.get(
                    f"{obs.prometheus_url}/api/v1/query",
                    params={"query": 'envoy_cluster_upstream_rq_total{envoy_cluster_name=~"model_.+"}'},
                )
                return {r["metric"].get("model", "") for r in response.json()["data"]["result"]}

            eventually(lambda: {QWEN, LLAMA} <= labelled(), 60, "Envoy's series labelled with the ids")
            # No cluster-derived (sanitised, hashed) name left as a model label.
            assert all(m in (QWEN, LLAMA) for m in labelled()), labelled()
        finally:
            obs.stop()
