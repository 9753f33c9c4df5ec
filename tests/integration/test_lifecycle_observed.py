"""A launched engine is watched like any endpoint, through the real Envoy, control plane and simulated
engines: once a request loads a model, its replica is in Prometheus' file-SD targets with its labels (and
scraped by a real Prometheus when one is installed), probed (a hung replica is marked unhealthy in EDS and
comes back), scraped by the telemetry (the model's time to first token), and a replica killed with SIGKILL
leaves every list while a new one replaces it; the status page shows the launched models' states,
the memory budget and the last lifecycle events, and a failed read of them in their own box only."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from control_plane.devstack.observability import NotInstalled, ObservabilityStack, find_binaries
from control_plane.observability.render import Timings
from control_plane.xds.resources import cluster_name
from tests.integration.conftest import StackFactory
from tests.support.cdp import Browser
from tests.support.chromium import chromium_binary
from tests.support.gateway import admin_client, eventually
from tests.support.registries import model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIM_MODELS = REPO / "deploy" / "models-sim"
QWEN, LLAMA = "qwen2-0.5b-instruct", "llama-3.2-1b-instruct"
PROBES = {"interval_s": 0.3, "timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 1, "jitter": 0}


def _doc(tmp_path: Path, budget_mb: int | None = None, *models: dict[str, Any]) -> dict[str, Any]:
    models_dir = tmp_path / "models"
    shutil.copytree(SIM_MODELS, models_dir)
    lifecycle: dict[str, Any] = {"model_dirs": [{"path": str(models_dir)}], "scan_interval_s": 3600}
    if budget_mb is not None:
        lifecycle["gpu_memory_mb"] = budget_mb
    return {
        "gateway": {"expose_upstream_host": True},
        "lifecycle": lifecycle,
        "health": PROBES,
        "telemetry": {"interval_s": 0.5},
        "models": list(models),
    }


def _chat(url: str, model_id: str, timeout: float = 60) -> httpx.Response:
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def _view(admin: httpx.Client, model_id: str) -> dict[str, Any]:
    response = admin.get(f"/admin/models/{model_id}")
    response.raise_for_status()
    return dict(response.json())


def _replica_health(admin: httpx.Client, model_id: str) -> str | None:
    replicas = _view(admin, model_id)["lifecycle"]["replicas"]
    return str(replicas[0]["health"]) if replicas else None


def _file_sd(stack: Any) -> list[dict[str, Any]]:
    path = stack.settings.work_dir / "prometheus" / "targets" / "backends.json"
    groups: list[dict[str, Any]] = json.loads(path.read_text())
    return groups


def _eds_health(client: httpx.Client, envoy_admin_url: str, model_id: str) -> dict[str, str]:
    """host:port → Envoy's health flags ("healthy", "/failed_eds_health", ...) of the model's cluster."""
    flags = {}
    for line in client.get(f"{envoy_admin_url}/clusters").text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster_name(model_id) and parts[2] == "health_flags":
            flags[parts[1]] = parts[3]
    return flags


def _engine_pid(port: int) -> int:
    """The simulated engine the control plane launched on `port` (found by its command line)."""
    for process in psutil.process_iter(["pid", "cmdline"]):
        argv = process.info["cmdline"] or []
        if "backends.simulator" in argv and any(
            a == "--port" and b == str(port) for a, b in itertools.pairwise(argv)
        ):
            return int(process.info["pid"])
    raise AssertionError(f"no engine process listens on port {port}")


@contextlib.contextmanager
def _prometheus(stack: Any) -> Iterator[ObservabilityStack | None]:
    """A real Prometheus reading the control plane's file-SD files, when the binaries are installed."""
    if isinstance(find_binaries(), NotInstalled):
        yield None
        return
    obs = ObservabilityStack(
        stack.settings.work_dir, prometheus_port=0, alertmanager_port=0, timings=Timings.fast()
    )
    try:
        obs.start(
            [e.admin_url for e in stack.envoys],
            stack.admin_url,
            stack.settings.admin_token,
            stack.registry(),
            write_targets=False,
        )
        yield obs
    finally:
        obs.stop()


def _prometheus_up(client: httpx.Client, obs: ObservabilityStack, endpoint_id: str) -> dict[str, str] | None:
    """The labels of the active scrape target of `endpoint_id` once it is up, else None."""
    response = client.get(f"{obs.prometheus_url}/api/v1/targets", params={"state": "active"})
    response.raise_for_status()
    for target in response.json()["data"]["activeTargets"]:
        labels = target["labels"]
        if labels.get("endpoint") == endpoint_id and target["health"] == "up":
            return dict(labels)
    return None


def _ttft(admin: httpx.Client, model_id: str) -> Any:
    values = admin.get("/admin/timeseries").json()["models"].get(model_id, {}).get("ttft_ms", [])
    return next((v for v in reversed(values) if v is not None), None)


def test_a_launched_replica_is_probed_scraped_and_its_death_noticed(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    stack = make_stack(_doc(tmp_path))
    url, envoy_admin = stack.envoys[0].url, stack.envoys[0].admin_url
    with _prometheus(stack) as obs, admin_client(stack) as admin, httpx.Client(timeout=10) as client:
        assert _view(admin, QWEN)["lifecycle"]["replicas"] == []
        assert not any(g["labels"]["model"] == QWEN for g in _file_sd(stack))  # cold: nothing to scrape

        assert _chat(url, QWEN).status_code == 200  # loads it
        view = _view(admin, QWEN)
        assert view["state"] == "ready"
        replica = view["lifecycle"]["replicas"][0]
        replica_id, address = replica["id"], replica["address"]
        port = int(address.rsplit(":", 1)[1])

        # Prometheus' file SD: the replica, with the labels of any endpoint.
        eventually(lambda: any(g["targets"] == [address] for g in _file_sd(stack)), 10, "the file-SD target")
        group = next(g for g in _file_sd(stack) if g["targets"] == [address])
        assert group["labels"] == {"model": QWEN, "endpoint": replica_id, "engine": view["engine"]}

        # Probed: healthy in the prober's view, and so in Envoy's EDS.
        eventually(lambda: _replica_health(admin, QWEN) == "healthy", 15, "the replica probed healthy")
        assert _eds_health(client, envoy_admin, QWEN) == {address: "healthy"}

        # Scraped by the telemetry: the engine's time to first token is the model's. A mean needs requests
        # between two scrapes, so they go on while it is awaited.
        def ttft_seen() -> bool:
            assert _chat(url, QWEN).status_code == 200
            return _ttft(admin, QWEN) is not None

        eventually(ttft_seen, 30, "the launched model's TTFT")
        if obs is not None:  # ...and by a real Prometheus, through the file SD
            labels: dict[str, dict[str, str] | None] = {"up": None}

            def scraped() -> bool:
                labels["up"] = _prometheus_up(client, obs, replica_id)
                return labels["up"] is not None

            eventually(scraped, 60, "Prometheus scraping the replica")
            assert labels["up"] is not None and labels["up"]["model"] == QWEN

        # Hung (stopped, not dead): the probes time out, EDS marks it unhealthy; resumed, it comes back.
        pid = _engine_pid(port)
        os.kill(pid, signal.SIGSTOP)
        try:
            eventually(
                lambda: _replica_health(admin, QWEN) == "unhealthy", 20, "the hung replica marked down"
            )
            eventually(
                lambda: "failed_eds_health" in _eds_health(client, envoy_admin, QWEN).get(address, ""),
                10,
                "Envoy told the replica is unhealthy",
            )
            assert _view(admin, QWEN)["lifecycle"]["replicas"][0]["health_reason"]
        finally:
            os.kill(pid, signal.SIGCONT)
        eventually(lambda: _replica_health(admin, QWEN) == "healthy", 20, "the resumed replica back")
        eventually(
            lambda: _eds_health(client, envoy_admin, QWEN) == {address: "healthy"},
            10,
            "Envoy told it is back",
        )

        # Killed: its exit is noticed with the reason, the replica leaves every list, and a new one
        # replaces it (lifecycle/supervision.py), watched in turn.
        os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:
            replicas = _view(admin, QWEN)["lifecycle"]["replicas"]
            return (
                len(replicas) == 1 and replicas[0]["address"] != address and replicas[0]["state"] == "ready"
            )

        eventually(replaced, 30, "a new replica in place of the killed one")
        new_address = _view(admin, QWEN)["lifecycle"]["replicas"][0]["address"]
        assert _view(admin, QWEN)["state"] == "ready"
        eventually(lambda: not any(g["targets"] == [address] for g in _file_sd(stack)), 10, "target removed")
        eventually(
            lambda: address not in _eds_health(client, envoy_admin, QWEN), 10, "the replica out of EDS"
        )
        events = [e for e in admin.get("/admin/lifecycle").json()["events"] if e["model"] == QWEN]
        exited = next(e for e in events if e["event"] == "replica exited")
        assert address in exited["detail"] and "exited with code -9" in exited["detail"], exited
        eventually(lambda: _replica_health(admin, QWEN) == "healthy", 15, "the new replica probed")
        assert any(g["targets"] == [new_address] for g in _file_sd(stack))
        assert _chat(url, QWEN).status_code == 200


def _page_lifecycle(browser: Browser) -> Any:
    return browser.evaluate(
        "(() => { const box = document.getElementById('lifecycle');"
        " const rows = [...box.querySelectorAll('tr[data-lifecycle-model]')];"
        " return { box: box.dataset.state, text: box.textContent,"
        "  states: Object.fromEntries(rows.map((r) => [r.dataset.lifecycleModel, r.dataset.state])),"
        "  replicas: [...box.querySelectorAll('[data-replica]')].map((r) => r.dataset.health),"
        "  budget: (document.getElementById('lifecycle-budget') || {}).textContent,"
        "  budgetData: Object.assign({}, (document.getElementById('lifecycle-budget') || {}).dataset),"
        "  events: [...box.querySelectorAll('tr[data-event]')].map((r) => r.dataset.event),"
        "  banners: document.getElementById('banners').textContent,"
        "  cards: [...document.querySelectorAll('article[data-model]')].length }; })()"
    )


async def _read_status_page(page_url: str, ready_model: str) -> tuple[Any, Any]:
    """The lifecycle box once it shows `ready_model` ready with a healthy replica; then again with every
    read of /admin/lifecycle blocked."""
    async with Browser(timeout_s=45) as browser:
        await browser.navigate(page_url)
        try:
            await browser.wait_for(
                f"!!document.querySelector('tr[data-lifecycle-model={json.dumps(ready_model)}][data-state=ready]"
                " [data-replica][data-health=healthy]')",
                what="the ready model with a healthy replica on the page",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the page shows {await _page_lifecycle(browser)}") from None
        shown = await _page_lifecycle(browser)
        await browser.send("Network.setBlockedURLs", urls=["*admin/lifecycle*"])
        await browser.navigate(page_url)
        await browser.wait_for(
            "document.body.dataset.state === 'ok'"
            " && document.getElementById('lifecycle').dataset.state === 'error'",
            what="the lifecycle box's error",
        )
        blocked = await _page_lifecycle(browser)
    return shown, blocked


@pytest.mark.skipif(chromium_binary() is None, reason="Chromium is not installed (apt install chromium)")
def test_the_status_page_shows_states_budget_and_events(make_stack: StackFactory, tmp_path: Path) -> None:
    broken = model("broken", "vllm", [], launch={"launcher": "vllm", "path": str(tmp_path)})
    broken.pop("endpoints")  # vLLM is not installed here: its load fails, with the reason
    stack = make_stack(_doc(tmp_path, 4096, broken))
    url = stack.envoys[0].url
    assert _chat(url, "broken").status_code == 503
    assert _chat(url, QWEN).status_code == 200
    assert _chat(url, LLAMA).status_code == 200  # the budget fits one: qwen is unloaded to make room
    page_url = f"{stack.admin_url}/#token={stack.settings.admin_token}"

    shown, blocked = asyncio.run(_read_status_page(page_url, LLAMA))

    assert shown["box"] == "ok"
    assert shown["states"][LLAMA] == "ready" and shown["states"][QWEN] == "cold", shown["states"]
    assert shown["states"]["broken"] == "failed"
    assert "cannot start" in shown["text"]  # the failure's reason
    with admin_client(stack) as admin:
        used = admin.get("/admin/lifecycle").json()["budget"]["used_mb"]
    assert used > 0 and shown["budgetData"] == {"used": str(used), "total": "4096"}, shown
    assert f"{used} / 4096 MB used" in shown["budget"], shown
    assert shown["replicas"] == ["healthy"]
    assert {"ready", "unloaded", "failed"} <= set(shown["events"]) and len(shown["events"]) <= 8
    # A failed read of the lifecycle: an error in its box, the rest of the page as usual.
    assert "could not be loaded" in blocked["text"], blocked
    assert "lifecycle" not in blocked["banners"].lower() and blocked["cards"] == shown["cards"] > 0
