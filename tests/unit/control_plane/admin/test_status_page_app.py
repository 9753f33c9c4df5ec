"""The status page's routes: the open HTML shell (no data, strict CSP) and the guarded JSON it polls."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import pytest
from fastapi import Depends
from fastapi.testclient import TestClient
from pydantic import SecretStr

from control_plane.admin.app import create_admin_app
from control_plane.admin.auth import bearer_guard
from control_plane.admin.status_page import content_security_policy, page, register_status_page
from control_plane.admin.timeseries import TimeSeriesSampler
from control_plane.admin.views import Observers
from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.lrs import LoadReportStore

pytestmark = pytest.mark.unit

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class Alerts:
    def __init__(self, items: list[dict[str, Any]] | None = None, fail: bool = False) -> None:
        self.items = items or []
        self.fail = fail
        self.limits: list[int] = []

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        self.limits.append(limit)
        if self.fail:
            raise RuntimeError("store is closed")
        return self.items[:limit]


def build(alerts: Any = None, with_sampler: bool = True, guard_as_depends: bool = True) -> TestClient:
    metrics = ControlPlaneMetrics.create()
    registry = parse_registry(
        {"models": [{"id": "qwen2", "engine": "tgi", "endpoints": [{"url": "http://127.0.0.1:9001"}]}]}
    )
    plane = ControlPlane(registry, cache=SnapshotCache(), metrics=metrics, resolver=lambda host: host)
    loads = LoadReportStore()
    app = create_admin_app(plane, metrics, None, SecretStr(TOKEN), Observers(loads=loads))
    sampler = TimeSeriesSampler(plane, loads) if with_sampler else None
    if sampler is not None:
        sampler.sample_once()
        sampler.sample_once()
    guard = bearer_guard(SecretStr(TOKEN))
    register_status_page(
        app, sampler=sampler, alerts=alerts, guard_dependency=Depends(guard) if guard_as_depends else guard
    )
    return TestClient(app)


def test_the_page_is_open_and_holds_no_data() -> None:
    client = build(alerts=Alerts())
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    body = response.text
    assert "<title>LLM gateway" in body
    assert "qwen2" not in body and TOKEN not in body  # data only comes through the guarded JSON
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", body)  # nothing from another origin
    assert 'href="data:,"' in body  # no favicon request
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


def test_the_csp_allows_exactly_the_inline_script_and_style() -> None:
    body, headers = page()
    html = body.decode()
    csp = headers["Content-Security-Policy"]
    assert csp == content_security_policy(html)
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert directives["script-src"] == f"'sha256-{digest}'"
    assert "style=" not in html  # inline style attributes would be blocked; the page sets styles via CSSOM


@pytest.mark.parametrize("guard_as_depends", [True, False])
def test_the_json_needs_the_token(guard_as_depends: bool) -> None:
    client = build(alerts=Alerts(), guard_as_depends=guard_as_depends)
    for path in ("/admin/timeseries", "/admin/status/alerts"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"authorization": "Bearer nope"}).status_code == 401
        assert client.get(path, headers=AUTH).status_code == 200


def test_timeseries() -> None:
    data = build().get("/admin/timeseries", headers=AUTH).json()
    assert data["interval_s"] == 2.0 and data["latency"] is None
    assert len(data["t"]) == 2
    assert data["models"]["qwen2"]["qps"] == [None, 0.0]
    assert data["models"]["qwen2"]["in_flight"] == [0, 0]
    assert build().get("/admin/timeseries?window_s=0", headers=AUTH).status_code == 422
    empty = build(with_sampler=False).get("/admin/timeseries", headers=AUTH).json()
    assert empty["t"] == [] and empty["models"] == {}


def test_alerts_newest_first_or_not_configured() -> None:
    assert build().get("/admin/status/alerts", headers=AUTH).json() == {
        "configured": False,
        "alerts": [],
        "error": None,
    }
    items = [
        {
            "received_at": 100.0 + i,
            "status": "firing" if i % 2 else "resolved",
            "alertname": f"A{i}",
            "labels": {"model": "qwen2"},
            "annotations": {"summary": "s"},
            "action": None,
        }
        for i in range(5)
    ]
    alerts = Alerts(items)
    data = build(alerts).get("/admin/status/alerts?limit=3", headers=AUTH).json()
    assert data["configured"] is True and data["error"] is None
    assert [a["alertname"] for a in data["alerts"]] == ["A2", "A1", "A0"]
    assert alerts.limits == [3]
    assert build(alerts).get("/admin/status/alerts?limit=0", headers=AUTH).status_code == 422


def test_a_failing_alert_store_is_reported_not_raised() -> None:
    data = build(Alerts(fail=True)).get("/admin/status/alerts", headers=AUTH).json()
    assert data["configured"] is True and data["alerts"] == [] and "store is closed" in data["error"]


def test_the_page_does_not_shadow_the_admin_routes() -> None:
    client = build(alerts=Alerts())
    assert client.get("/admin/status", headers=AUTH).json()["models"][0]["id"] == "qwen2"
    assert client.get("/healthz").json() == {"status": "ok"}
    documented = set(client.get("/openapi.json").json()["paths"])
    assert {"/admin/timeseries", "/admin/status/alerts", "/admin/status"} <= documented
    assert "/" not in documented  # the page is not part of the API
