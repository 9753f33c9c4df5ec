"""The status page of a real stack in headless Chromium: Envoy, the control plane, simulated model
servers, load through the gateway, one endpoint drained by clicking its button on the page (Chromium
driven over the DevTools protocol), the drain audited with its actor; with a real Prometheus scraping
Envoy (when the `prometheus` binary is installed) for the latency chart and the page's link to it.

`STATUS_PAGE_SCREENSHOT=docs/images/status-page.png` also writes the screenshot there, and
`STATUS_PAGE_LOAD_S` sets how long load runs before it (default 12 s): that is how the documentation's
image is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.devstack.procs import free_port, http_ok, wait_until
from tests.integration.conftest import StackFactory
from tests.support.cdp import Browser
from tests.support.chromium import Dom, chromium_binary, dump_dom, screenshot
from tests.support.gateway import admin_client, eventually
from tests.support.registries import model, registry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(chromium_binary() is None, reason="Chromium is not installed (apt install chromium)"),
]

PROBES = {"interval_s": 0.5, "timeout_s": 1.0, "unhealthy_threshold": 2, "healthy_threshold": 1, "jitter": 0}


class Prometheus:
    """A real Prometheus scraping the stack's Envoys every second (started after them, stopped by PID)."""

    def __init__(self, work_dir: Path, port: int) -> None:
        self.work_dir = work_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, envoy_admin_urls: list[str]) -> None:
        targets = ", ".join(f'"{u.removeprefix("http://")}"' for u in envoy_admin_urls)
        config = self.work_dir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: envoy\n"
            "    metrics_path: /stats/prometheus\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n"
        )
        log = (self.work_dir / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_until(lambda: http_ok(f"{self.url}/-/ready"), 30, "Prometheus to be ready")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def prometheus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Prometheus | None]:
    """A Prometheus the control plane is pointed at (`PROMETHEUS_URL`), or None without the binary."""
    if shutil.which("prometheus") is None:
        yield None
        return
    work = tmp_path / "prometheus"
    work.mkdir()
    server = Prometheus(work, free_port())
    monkeypatch.setenv("PROMETHEUS_URL", server.url)  # read by `control_plane serve` (--prometheus-url)
    try:
        yield server
    finally:
        server.stop()


class Load:
    """Chat requests through the gateway from a few threads, until stopped (bounded by `max_s`)."""

    def __init__(self, url: str, models: list[str], threads: int = 6, max_s: float = 300) -> None:
        self.url = url
        self.models = models
        self.stop_at = time.monotonic() + max_s
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < self.stop_at:
                body = {
                    "model": self.models[index % len(self.models)],
                    "messages": [{"role": "user", "content": "Hello " * rng.randint(1, 40)}],
                    "max_tokens": rng.randint(4, 24),
                }
                try:
                    status = client.post(f"{self.url}/v1/chat/completions", json=body).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                self._stop.wait(rng.uniform(0.0, 0.15))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=35)


async def _drain_from_the_page(page_url: str, endpoint_id: str) -> str:
    """Click the endpoint's Drain button twice (arm, confirm); the banner's text once it is done."""
    button = f'tr[data-endpoint="{endpoint_id}"] button[data-action="drain"]'
    async with Browser(timeout_s=45) as browser:
        await browser.navigate(page_url)
        await browser.wait_for("document.body.dataset.state === 'ok'", what="the status page")
        await browser.click(button)
        await browser.wait_for(f"document.querySelector({button!r}).classList.contains('armed')")
        await browser.click(button)
        return str(
            await browser.wait_for(
                "(document.getElementById('action-result') || {}).textContent", what="the drain's result"
            )
        )


def _latest(series: dict[str, Any], model_id: str, figure: str) -> Any:
    values = series["models"].get(model_id, {}).get(figure, [])
    return next((v for v in reversed(values) if v is not None), None)


def _error_share(series: dict[str, Any], model_id: str) -> float:
    figures = series["models"][model_id]
    errors = sum(v for v in figures["error_qps"] if v is not None)
    answered = sum(v for v in figures["answered_qps"] if v is not None)
    return errors / answered if answered else 0.0


def test_status_page_of_a_running_gateway(
    make_stack: StackFactory, prometheus: Prometheus | None, tmp_path: Path
) -> None:
    stack = make_stack(
        {
            **registry(
                model("qwen2", "tgi", [free_port(), free_port()], aliases=["qwen"]),
                model("llama3", "vllm", [free_port(), free_port()], aliases=["Llama-3.1-8B-Instruct"]),
            ),
            "health": PROBES,
        },
        sim_profile="default",
        sim_extra_args={"llama3-1": ["--error-rate", "0.12"]},  # llama3 answers ~6 % of requests with 5xx
    )
    if prometheus is not None:
        prometheus.start([envoy.admin_url for envoy in stack.envoys])
    token = stack.settings.admin_token
    page_url = f"{stack.admin_url}/#token={token}"

    with httpx.Client(base_url=stack.admin_url, timeout=10) as anonymous:
        shell = anonymous.get("/")
        assert shell.status_code == 200 and "text/html" in shell.headers["content-type"]
        assert "qwen2" not in shell.text and token not in shell.text  # the shell is open and holds no data
        assert "default-src 'none'" in shell.headers["content-security-policy"]
        assert anonymous.get("/admin/timeseries").status_code == 401
        assert anonymous.get("/admin/status/alerts").status_code == 401

    load_s = float(os.environ.get("STATUS_PAGE_LOAD_S", "12"))
    with admin_client(stack) as admin, Load(stack.envoys[0].url, ["qwen2", "llama3"]) as load:
        eventually(
            lambda: admin.get("/admin/status").json()["models"][0]["healthy_endpoints"] == 2,
            timeout_s=20,
            what="probes",
        )
        time.sleep(load_s / 2)
        result = asyncio.run(_drain_from_the_page(page_url, "qwen2-1"))
        assert "drain endpoint qwen2-1: done" in result and "applied by 1 Envoy" in result, result
        assert admin.get("/admin/endpoints/qwen2-1").json()["draining"] is True
        eventually(
            lambda: admin.get("/admin/endpoints/qwen2-1").json()["drained"] is True,
            timeout_s=30,
            what="qwen2-1 to be drained",
        )
        time.sleep(load_s / 2)

        def traffic_seen() -> bool:
            series = admin.get("/admin/timeseries").json()
            return all((_latest(series, m, "qps") or 0) > 0 for m in ("qwen2", "llama3"))

        eventually(traffic_seen, timeout_s=15, what="QPS of both models in the time series")
        # TTFT from the vLLM simulator's histogram (TGI exports none); decode speed from both engines.
        eventually(
            lambda: _latest(admin.get("/admin/timeseries").json(), "llama3", "ttft_ms") is not None,
            timeout_s=20,
            what="llama3's time to first token in the time series",
        )
        if prometheus is not None:
            eventually(
                lambda: _latest(admin.get("/admin/timeseries").json(), "qwen2", "p99_ms") is not None,
                timeout_s=45,
                what="latency from Prometheus in the time series",
            )
        series = admin.get("/admin/timeseries").json()

        # What Alertmanager would send for the gateway's HighErrorRate rule, through the real webhook.
        share = _error_share(series, "llama3")
        notification = {
            "version": "4",
            "status": "firing",
            "receiver": "control-plane",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "HighErrorRate", "model": "llama3", "severity": "critical"},
                    "annotations": {"summary": f"{share:.1%} of requests to llama3 fail with 5xx"},
                    "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "fingerprint": "status-page-test",
                }
            ],
        }
        admin.post("/alerts/webhook", json=notification).raise_for_status()
        audit = admin.get("/admin/audit").json()["entries"]

        dom = Dom(dump_dom(page_url))
        png = screenshot(page_url, tmp_path / "status-page.png")
    assert sum(load.statuses.get(code, 0) for code in (200,)) > 0, load.statuses

    assert dom.one("body").attrs["data-state"] == "ok", dom.one("body")
    assert [m.attrs["data-model"] for m in dom.find("article")] == ["qwen2", "llama3"]
    rows = {r.attrs["data-endpoint"]: r for r in dom.find("tr") if "data-endpoint" in r.attrs}
    assert set(rows) == {"qwen2-0", "qwen2-1", "llama3-0", "llama3-1"}
    assert rows["qwen2-1"].attrs["data-state"] == "drained"
    assert all(rows[e].attrs["data-state"] == "serving" for e in ("qwen2-0", "llama3-0", "llama3-1"))
    assert all(r.attrs["data-health"] == "healthy" for r in rows.values())
    assert "1 Envoy connected" in dom.one("span", id="summary").text
    drains = [(e["target"], e["actor"]) for e in audit if e["action"] == "endpoint.draining"]
    assert drains == [("qwen2-1", "admin-token")], audit
    assert [e["actor"] for e in audit if e["action"] == "alert.firing"] == ["alertmanager:HighErrorRate"]
    links = {a.attrs["data-link"]: a.attrs["href"] for a in dom.find("a") if "data-link" in a.attrs}
    assert links == ({"prometheus": prometheus.url} if prometheus is not None else {})

    charts = {c.attrs["data-chart"]: c for c in dom.find("div") if "data-chart" in c.attrs}
    assert {"qps", "errors", "in_flight", "ttft", "tokens_per_s"} <= set(charts)
    assert "llama3" in charts["ttft"].text and "qwen2" in charts["tokens_per_s"].text
    assert {p.attrs["data-model"] for p in dom.find("path") if "data-model" in p.attrs} == {"qwen2", "llama3"}
    if prometheus is not None:
        assert series["latency"]["source"] == "prometheus" and series["latency"]["error"] is None
        assert "latency" in charts and "Latency from" in dom.one("p", id="charts-note").text
    else:
        assert "latency" not in charts and series["latency"] is None
    alerts = dom.one("div", id="alerts")
    assert alerts.attrs["data-configured"] == "true"
    assert dom.one("tr", data_alert="HighErrorRate").attrs["data-status"] == "firing"
    assert "of requests to llama3 fail with 5xx" in alerts.text

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("STATUS_PAGE_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(shutil.SameFileError):
            shutil.copyfile(png, target)
