"""`/admin/keys/{id}/usage` and `/admin/usage/top` through the real admin app, wired as the control plane
wires them (TenancyWiring: the usage routes before the key routes' `{id:path}`), served by uvicorn:
totals and rows by model and by time, 404 for an unknown key, 422 naming the bad parameter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi import Depends
from pydantic import SecretStr

from control_plane.admin.app import create_admin_app
from control_plane.admin.auth import bearer_guard
from control_plane.admin.status_page import register_status_page
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.store.overlay import AdminStore
from control_plane.tenancy.keys import KeySettings
from control_plane.tenancy.wiring import TenancyWiring
from control_plane.xds.cache import SnapshotCache
from tests.support.asgi_server import serve_app
from tests.support.chromium import Dom, chromium_binary, dump_dom
from tests.support.usage_entries import REGISTRY, keyed_entry

pytestmark = pytest.mark.unit

TOKEN = "usage-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@dataclass
class Api:
    url: str
    client: httpx.Client
    tenancy: TenancyWiring
    ids: dict[str, str]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    db = tmp_path / "gateway.db"
    metrics = ControlPlaneMetrics.create()
    store = AdminStore(db)
    plane = ControlPlane(REGISTRY, cache=SnapshotCache(), metrics=metrics, store=store, resolver=lambda h: h)

    async def build() -> tuple[TenancyWiring, dict[str, str]]:
        tenancy = TenancyWiring.create(plane, db, store, grpc.aio.server(), None, metrics)
        ids = {}
        for name in ("team-a", "team-b", "team-c"):
            key, _ = await tenancy.keys.create(KeySettings(name=name))
            ids[name] = key.id
        return tenancy, ids

    tenancy, ids = asyncio.run(build())
    now = time.time()
    record = tenancy.usage.record
    for _ in range(3):
        record(keyed_entry(ids["team-a"], "team-a", "qwen", prompt=10, completion=20, start=now - 30))
    record(keyed_entry(ids["team-a"], "team-a", "llama3", prompt=5, completion=5, start=now - 7200))
    record(keyed_entry(ids["team-a"], "team-a", "qwen", 429, "rate_limit_exceeded", start=now - 30))
    record(keyed_entry(ids["team-b"], "team-b", "llama3", prompt=500, completion=500, start=now - 60))
    record(keyed_entry(ids["team-c"], "team-c", "llama3", prompt=1, completion=1, start=now - 60))
    tenancy.usage.flush()  # part stored, part pending: the API shows both
    record(keyed_entry(ids["team-a"], "team-a", "qwen", 500, "upstream_error", start=now - 10))
    app = create_admin_app(plane, metrics, None, SecretStr(TOKEN))
    guard = Depends(bearer_guard(SecretStr(TOKEN)))
    tenancy.register_routes(app, dependencies=[guard])
    register_status_page(app, sampler=None, alerts=None, guard_dependency=guard)
    with serve_app(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        yield Api(url, client, tenancy, ids)
    tenancy.close()
    store.close()


def test_usage_of_a_key_by_model_and_by_time(api: Api) -> None:
    key_id = api.ids["team-a"]
    answer = api.client.get(f"/admin/keys/{key_id}/usage", params={"since": "3h"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["key_id"] == key_id and body["key_name"] == "team-a" and body["by"] == "model"
    assert body["totals"] == {
        "requests": 6,
        "prompt_tokens": 35,
        "completion_tokens": 65,
        "total_tokens": 100,
        "errors": 1,
        "rate_limited": 1,
        "estimated": 0,
    }
    assert [(r["model"], r["requests"], r["total_tokens"]) for r in body["rows"]] == [
        ("llama3", 1, 10),
        ("qwen2", 5, 90),
    ]
    # The default window (24 h) holds them all too; one of 1 h leaves out the llama3 call of 2 h ago.
    assert api.client.get(f"/admin/keys/{key_id}/usage").json()["totals"]["requests"] == 6
    recent = api.client.get(f"/admin/keys/{key_id}/usage", params={"since": "1h", "by": "minute"}).json()
    assert recent["totals"]["requests"] == 5 and recent["totals"]["total_tokens"] == 90
    assert all(r["start"].endswith(":00Z") for r in recent["rows"])
    assert sum(r["requests"] for r in recent["rows"]) == 5
    by_hour = api.client.get(f"/admin/keys/{key_id}/usage", params={"since": "3h", "by": "hour"}).json()
    assert len(by_hour["rows"]) == 2 and by_hour["rows"][0]["start"] < by_hour["rows"][1]["start"]
    # ISO times; a window that ends before anything happened is empty.
    until = "2001-01-01T00:00:00Z"
    empty = api.client.get(
        f"/admin/keys/{key_id}/usage", params={"since": "2000-01-01T00:00:00", "until": until}
    )
    assert empty.status_code == 200 and empty.json()["rows"] == [] and empty.json()["totals"]["requests"] == 0


def test_top_keys_by_tokens(api: Api) -> None:
    top = api.client.get("/admin/usage/top", params={"window": "1h", "limit": 2}).json()
    assert [(k["key_name"], k["total_tokens"]) for k in top["keys"]] == [("team-b", 1000), ("team-a", 90)]
    assert top["window"] == "1h"
    day = api.client.get("/admin/usage/top", params={"window": "1d"}).json()
    assert [k["key_name"] for k in day["keys"]] == ["team-b", "team-a", "team-c"]
    assert day["keys"][1]["total_tokens"] == 100


@pytest.mark.parametrize(
    ("path", "params", "status", "names"),
    [
        ("/admin/keys/key_ffffffffffffffff/usage", {}, 404, "key_ffffffffffffffff"),
        ("/admin/keys/nope/usage", {}, 422, "not a key id"),
        ("/admin/keys/{a}/usage", {"since": "yesterday"}, 422, "since"),
        ("/admin/keys/{a}/usage", {"since": "0h"}, 422, "since"),
        ("/admin/keys/{a}/usage", {"until": "2h", "since": "1h"}, 422, "since: must be before until"),
        ("/admin/keys/{a}/usage", {"until": "not-a-time"}, 422, "until"),
        ("/admin/keys/{a}/usage", {"by": "week"}, 422, "by"),
        ("/admin/keys/{a}/usage", {"since": "30d", "by": "minute"}, 422, "by: more than"),
        ("/admin/usage/top", {"window": "soon"}, 422, "window"),
        ("/admin/usage/top", {"window": "400d"}, 422, "window: at most the retention"),
        ("/admin/usage/top", {"limit": 0}, 422, "limit"),
        ("/admin/usage/top", {"limit": 1000}, 422, "limit"),
    ],
)
def test_bad_requests_name_what_is_wrong(
    api: Api, path: str, params: dict[str, Any], status: int, names: str
) -> None:
    answer = api.client.get(path.format(a=api.ids["team-a"]), params=params)
    assert answer.status_code == status, answer.text
    assert names in answer.text


def test_usage_needs_the_admin_token(api: Api) -> None:
    path = f"/admin/keys/{api.ids['team-a']}/usage"
    assert httpx.get(f"{api.client.base_url}{path}").status_code == 401
    assert httpx.get(f"{api.client.base_url}/admin/usage/top").status_code == 401


@pytest.mark.skipif(chromium_binary() is None, reason="Chromium is not installed (apt install chromium)")
def test_the_status_page_shows_the_top_keys(api: Api) -> None:
    dom = Dom(dump_dom(f"{api.url}/#token={TOKEN}"))
    assert dom.one("body").attrs["data-state"] == "ok", dom.one("body")
    # Most tokens first; the llama3 call of team-a 2 h ago is outside the hour.
    order = [e.attrs["data-key"] for e in dom.elements if e.tag == "tr" and "data-key" in e.attrs]
    assert order == ["team-b", "team-a", "team-c"]
    at = dom.elements.index(dom.one("tr", data_key="team-a"))
    cells = []
    for element in dom.elements[at + 1 :]:
        if element.tag == "tr":
            break
        if element.tag == "td":
            cells.append(element.text)
    # key, requests, prompt, completion, tokens, errors, 429s
    assert cells == [f"team-a {api.ids['team-a']}", "5", "30", "60", "90", "1", "1"]
