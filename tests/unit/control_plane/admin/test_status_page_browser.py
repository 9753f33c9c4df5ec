"""The status page rendered by headless Chromium, served by an in-process admin app on a real port.

A real `ControlPlane` (no Envoy: load reports are recorded into the store directly), the real admin app
with the status page registered, uvicorn on an ephemeral port; an endpoint is drained through the admin
API; Chromium loads the page with the token in the URL fragment and the rendered DOM is checked. The
action tests drive Chromium over the DevTools protocol (tests/support/cdp.py): real clicks on the page's
buttons, then the gateway's state and audit log are checked; `/docs` is loaded with nothing but
loopback reachable.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from control_plane.admin.app import create_admin_app
from control_plane.admin.auth import bearer_guard
from control_plane.admin.status_page import register_status_page
from control_plane.admin.timeseries import TimeSeriesSampler
from control_plane.admin.views import Observers
from control_plane.config import parse_registry
from control_plane.health.prober import EndpointHealth
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.state import Health
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.lrs import EndpointSample, LoadReportStore
from tests.support.cdp import Browser
from tests.support.chromium import Dom, chromium_binary, dump_dom, screenshot

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(chromium_binary() is None, reason="Chromium is not installed (apt install chromium)"),
]

TOKEN = "browser-test-token"
PROMETHEUS = "http://127.0.0.1:9/prometheus"  # only linked, never fetched
ALERTMANAGER = "http://127.0.0.1:9/alertmanager"
ENDPOINTS = {"qwen2-0": 9101, "qwen2-1": 9102, "llama3-0": 9201, "llama3-1": 9202}


class Prober:
    """Health as the prober would report it: one endpoint down, the rest healthy."""

    def status(self, endpoint_id: str) -> EndpointHealth:
        if endpoint_id == "llama3-1":
            return EndpointHealth(
                Health.UNHEALTHY, "unreachable: connection refused", last_probe_at=time.time()
            )
        return EndpointHealth(Health.HEALTHY, "", last_probe_at=time.time())


class Alerts:
    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return [
            {
                "received_at": time.time() - 30,
                "status": "firing",
                "alertname": "EndpointHighErrorRate",
                "labels": {"model": "llama3", "endpoint": "llama3-1", "severity": "warning"},
                "annotations": {"summary": "llama3-1 answers <b>5xx</b> to 12% of requests"},
                "action": "drained llama3-1",
            }
        ][:limit]


@dataclass
class Served:
    url: str
    plane: ControlPlane
    loads: LoadReportStore
    sampler: TimeSeriesSampler


def _registry() -> Any:
    return parse_registry(
        {
            "models": [
                {
                    "id": model,
                    "engine": engine,
                    "aliases": aliases,
                    "endpoints": [
                        {"id": e, "url": f"http://127.0.0.1:{port}"}
                        for e, port in ENDPOINTS.items()
                        if e.startswith(model)
                    ],
                }
                for model, engine, aliases in (("qwen2", "tgi", ["qwen"]), ("llama3", "vllm", []))
            ]
        }
    )


def _history(loads: LoadReportStore, sampler: TimeSeriesSampler, clock: list[float]) -> None:
    """Two minutes of recorded load reports, sampled every 2 s of a fake clock."""
    for step in range(60):
        loads.record(
            "envoy-1",
            [
                EndpointSample(
                    "model_qwen2", "127.0.0.1:9101", in_progress=3, issued=12 + step % 5, successful=12
                ),
                EndpointSample("model_qwen2", "127.0.0.1:9102", in_progress=0, issued=10, successful=10),
                EndpointSample("model_llama3", "127.0.0.1:9201", in_progress=2, issued=6, successful=6),
                EndpointSample("model_llama3", "127.0.0.1:9202", issued=2, successful=1, errors=1),
            ],
        )
        clock[0] += 2.0
        clock[1] += 2.0
        sampler.sample_once()
    # The latest report: qwen2-1 is empty (its drain is over), the others carry requests.
    loads.record(
        "envoy-1",
        [
            EndpointSample("model_qwen2", "127.0.0.1:9101", in_progress=4),
            EndpointSample("model_llama3", "127.0.0.1:9201", in_progress=2),
        ],
    )


@pytest.fixture
def served() -> Iterator[Served]:
    metrics = ControlPlaneMetrics.create()
    plane = ControlPlane(_registry(), cache=SnapshotCache(), metrics=metrics, resolver=lambda host: host)
    loads = LoadReportStore(stale_after_s=3600)
    loads.node_connected("envoy-1")
    clock = [1000.0, time.time() - 120]
    sampler = TimeSeriesSampler(plane, loads, clock=lambda: clock[0], wall_clock=lambda: clock[1])
    sampler.sample_once()
    _history(loads, sampler, clock)

    app = create_admin_app(
        plane,
        metrics,
        None,
        SecretStr(TOKEN),
        Observers(prober=Prober(), loads=loads),  # type: ignore[arg-type]
        links={"prometheus": PROMETHEUS, "alertmanager": ALERTMANAGER, "evil": "javascript:alert(1)"},
    )
    register_status_page(
        app, sampler=sampler, alerts=Alerts(), guard_dependency=bearer_guard(SecretStr(TOKEN))
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield Served(f"http://127.0.0.1:{port}", plane, loads, sampler)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _drain(served: Served, endpoint_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=served.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10) as admin:
        response = admin.post(f"/admin/endpoints/{endpoint_id}/drain")
        response.raise_for_status()
        return dict(response.json())


def test_page_shows_models_endpoints_drain_charts_and_alerts(served: Served, tmp_path: Path) -> None:
    drained = _drain(served, "qwen2-1")
    assert drained["draining"] is True and drained["drained"] is True  # nothing in flight on it

    dom = Dom(dump_dom(f"{served.url}/#token={TOKEN}"))

    assert dom.one("body").attrs["data-state"] == "ok", dom.one("body")
    assert [m.attrs["data-model"] for m in dom.find("article")] == ["qwen2", "llama3"]
    rows = {r.attrs["data-endpoint"]: r for r in dom.find("tr") if "data-endpoint" in r.attrs}
    assert list(rows) == ["qwen2-0", "qwen2-1", "llama3-0", "llama3-1"]
    assert rows["qwen2-1"].attrs["data-state"] == "drained" and "drained" in rows["qwen2-1"].text
    assert (
        rows["qwen2-0"].attrs["data-state"] == "serving" and rows["qwen2-0"].attrs["data-health"] == "healthy"
    )
    assert rows["llama3-1"].attrs["data-health"] == "unhealthy"
    assert rows["llama3-1"].attrs["data-state"] == "unhealthy"  # never "serving" while its probes fail
    assert "serving" not in dom.one("tr", data_endpoint="llama3-1").text.split()
    assert "unreachable: connection refused" in rows["llama3-1"].text
    assert "127.0.0.1:9101" in rows["qwen2-0"].text
    qwen = dom.one("article", data_model="qwen2")
    assert (
        "tgi" in qwen.text
        and "qwen" in qwen.text
        and "1/2 serving" in qwen.text
        and "4 in flight" in qwen.text
    )

    charts = {c.attrs["data-chart"]: c for c in dom.find("div") if "data-chart" in c.attrs}
    assert list(charts) == ["qps", "errors", "in_flight"]  # no latency source: no latency chart
    lines = {p.attrs["data-model"] for p in dom.find("path") if "data-model" in p.attrs}
    assert lines == {"qwen2", "llama3"}
    # The last sample: qwen2 (16 + 10) / 2 s, llama3 8 / 2 s with 1 error of 8 answered.
    assert "qwen2 13" in charts["qps"].text and "llama3 4" in charts["qps"].text
    assert "llama3 12.5%" in charts["errors"].text
    assert "no Prometheus is configured" in dom.one("p", id="charts-note").text
    links = {a.attrs["data-link"]: a.attrs["href"] for a in dom.find("a") if "data-link" in a.attrs}
    assert links == {"prometheus": PROMETHEUS, "alertmanager": ALERTMANAGER}

    alerts = dom.one("div", id="alerts")
    assert "EndpointHighErrorRate" in alerts.text and "drained llama3-1" in alerts.text
    assert "<b>5xx</b>" in alerts.text  # shown as text, never parsed as markup
    assert not [b for b in dom.find("b") if b.text == "5xx"]

    png = screenshot(f"{served.url}/#token={TOKEN}", tmp_path / "status.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_a_token_the_page_asks_for_one_and_shows_nothing(served: Served) -> None:
    dom = Dom(dump_dom(f"{served.url}/", budget_ms=2000))
    assert dom.one("body").attrs["data-state"] == "login"
    assert "hidden" not in dom.one("section", id="login").attrs
    assert "hidden" in dom.one("main", id="dashboard").attrs
    assert not dom.find("article") and "qwen2" not in "".join(e.text for e in dom.elements)


def test_a_wrong_token_is_refused_and_forgotten(served: Served) -> None:
    dom = Dom(dump_dom(f"{served.url}/#token=wrong", budget_ms=2000))
    assert dom.one("body").attrs["data-state"] == "login"
    assert "refused" in dom.one("p", id="login-error").text
    assert not dom.find("article")


def _audit(served: Served) -> list[dict[str, Any]]:
    return served.plane.store.audit(50)


def test_drain_and_disable_from_the_page_are_applied_and_audited_with_the_actor(served: Served) -> None:
    drain = 'tr[data-endpoint="qwen2-0"] button[data-action="drain"]'
    disable = 'article[data-model="llama3"] button[data-action="disable"]'

    async def scenario() -> list[str]:
        async with Browser() as browser:
            await browser.navigate(f"{served.url}/#token={TOKEN}")
            await browser.wait_for("document.body.dataset.state === 'ok'", what="the page to load")
            # One click only arms the button: nothing is changed yet.
            await browser.click(drain)
            await browser.wait_for(f"document.querySelector({drain!r}).classList.contains('armed')")
            assert "qwen2-0" not in served.plane.inputs.draining_endpoints
            await browser.click(drain)  # the confirmation
            state = await browser.wait_for(
                "(() => { const r = document.querySelector('tr[data-endpoint=\"qwen2-0\"]');"
                " return r && r.dataset.state !== 'serving' ? r.dataset.state : null; })()",
                what="qwen2-0 to leave serving on the page",
            )
            assert state in ("draining", "drained")
            banner = await browser.evaluate("document.getElementById('action-result').textContent")
            assert "drain endpoint qwen2-0: done" in banner and "no Envoy is connected" in banner
            # The model's own buttons: disable llama3.
            await browser.click(disable)
            await browser.wait_for(f"document.querySelector({disable!r}).classList.contains('armed')")
            await browser.click(disable)
            await browser.wait_for(
                "document.querySelector('article[data-model=\"llama3\"]').dataset.enabled === 'false'",
                what="llama3 to show disabled",
            )
            # And undrain qwen2-0 again.
            undrain = 'tr[data-endpoint="qwen2-0"] button[data-action="undrain"]'
            await browser.click(undrain)
            await browser.wait_for(f"document.querySelector({undrain!r}).classList.contains('armed')")
            await browser.click(undrain)
            await browser.wait_for(
                "document.querySelector('tr[data-endpoint=\"qwen2-0\"]').dataset.state === 'serving'",
                what="qwen2-0 to serve again",
            )
            return browser.console

    console = asyncio.run(scenario())
    assert not [line for line in console if line.startswith("exception")], console
    assert "qwen2-0" not in served.plane.inputs.draining_endpoints
    assert not served.plane.registry.model("llama3").enabled  # type: ignore[union-attr]
    entries = [(e["action"], e["target"], e["actor"]) for e in reversed(_audit(served))]
    assert entries == [
        ("endpoint.draining", "qwen2-0", "admin-token"),
        ("model.enabled", "llama3", "admin-token"),
        ("endpoint.draining", "qwen2-0", "admin-token"),
    ]
    assert [e["detail"] for e in reversed(_audit(served))] == ["true", "false", ""]


def test_api_docs_load_with_no_network_but_loopback(served: Served) -> None:
    async def scenario() -> tuple[str, int, list[str]]:
        async with Browser() as browser:
            await browser.navigate(f"{served.url}/docs")
            count = await browser.wait_for(
                "document.querySelectorAll('.opblock').length", what="Swagger UI to list the operations"
            )
            title = await browser.evaluate("document.querySelector('.swagger-ui .info .title').textContent")
            return title, count, browser.requests

    title, operations, requests = asyncio.run(scenario())
    assert "LLM gateway admin API" in title
    assert operations >= 15
    assert requests and all(u.startswith(served.url) for u in requests if not u.startswith("data:")), requests
    assert any(u.endswith("/docs/assets/swagger-ui-bundle.js") for u in requests)
