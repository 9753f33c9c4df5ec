"""`/admin/keys` through the real admin app (its auth, body and path gates) served by uvicorn: every path,
its 201/200/404/409/422/503 answers, and the clear key shown once and never again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends
from pydantic import SecretStr

from control_plane.admin.app import create_admin_app
from control_plane.admin.auth import bearer_guard
from control_plane.admin.keys import register_key_routes
from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.store.overlay import AdminStore
from control_plane.tenancy.keys import ApiKey, key_hash
from control_plane.tenancy.service import KeyService
from control_plane.tenancy.store import SqliteKeyStore
from control_plane.xds.cache import SnapshotCache
from tests.support.asgi_server import serve_app

pytestmark = pytest.mark.unit

TOKEN = "keys-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CI_SECRET = "sk-gw-declared-in-the-file"


@dataclass
class Api:
    client: httpx.Client
    service: KeyService
    tables: list[tuple[ApiKey, ...]]
    fail_push: list[bool]
    seen: list[str] = field(default_factory=list)  # every response body, to look for secrets in

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        self.seen.append(response.text)
        return response


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    registry = parse_registry(
        {
            "models": [
                {
                    "id": "qwen2",
                    "engine": "tgi",
                    "aliases": ["qwen"],
                    "endpoints": [{"url": "http://127.0.0.1:9101"}],
                },
                {"id": "llama3", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:9201"}]},
            ],
            "auth": {
                "mode": "api_key",
                "keys": [{"name": "ci", "sha256": key_hash(CI_SECRET), "rpm_limit": 5}],
            },
        }
    )
    db = tmp_path / "gateway.db"
    metrics = ControlPlaneMetrics.create()
    plane = ControlPlane(
        registry, cache=SnapshotCache(), metrics=metrics, store=AdminStore(db), resolver=lambda h: h
    )
    keys = SqliteKeyStore(db)
    service = KeyService(
        keys, audit=lambda action, target, detail: plane.store.write([], action, target, detail)
    )
    tables: list[tuple[ApiKey, ...]] = []
    fail_push = [False]

    async def push(table: tuple[ApiKey, ...]) -> None:
        tables.append(table)
        if fail_push[0]:
            raise RuntimeError("no gateway answered")

    service.add_listener(push)
    asyncio.run(service.follow(plane.registry))
    plane.add_registry_listener(service.follow)
    app = create_admin_app(plane, metrics, None, SecretStr(TOKEN))
    register_key_routes(app, service, dependencies=[Depends(bearer_guard(SecretStr(TOKEN)))])
    with serve_app(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        yield Api(client, service, tables, fail_push)
    keys.close()
    plane.store.close()


def _create(api: Api, **body: Any) -> dict[str, Any]:
    response = api.call("POST", "/admin/keys", json={"name": "team-a", **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_create_shows_the_key_once(api: Api) -> None:
    created = _create(
        api,
        owner="Team A",
        models=["qwen", "llama3"],
        rpm_limit=60,
        tpm_limit=10_000,
        max_concurrent=4,
        budget_tokens=1_000_000,
        budget_period="month",
        expires_at="2999-01-01T00:00:00+02:00",
        priority="high",
    )
    secret = created.pop("key")
    assert secret.startswith("sk-gw-") and created["prefix"] == secret[:12]
    assert created["id"].startswith("key_") and created["source"] == "admin" and created["active"] is True
    assert created["models"] == ["qwen", "llama3"] and created["expires_at"] == "2998-12-31T22:00:00Z"
    assert "sha256" not in created and created["revoked_at"] is None
    assert api.tables[-1][-1].sha256 == key_hash(secret)  # pushed, by hash

    shown = api.call("GET", f"/admin/keys/{created['id']}").json()
    assert shown == created
    listed = api.call("GET", "/admin/keys").json()
    assert [k["id"] for k in listed["keys"]] == ["reg_ci", created["id"]] and listed["warnings"] == []
    audit = api.call("GET", "/admin/audit", params={"limit": 1}).json()["entries"][0]
    assert (
        audit["action"] == "key.create"
        and audit["target"] == created["id"]
        and audit["actor"] == "admin-token"
    )
    # The only answer holding the key was the creation's.
    first, *later = api.seen
    assert secret in first and not any(secret in text or secret[12:] in text for text in later)
    assert not any(key_hash(secret) in text for text in api.seen)


def test_the_admin_token_is_needed(api: Api) -> None:
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/reg_ci")):
        response = httpx.request(method, f"{api.client.base_url}{path}", json={"name": "x"})
        assert response.status_code == 401, (method, path)
    assert api.service.list_keys()[0].id == "reg_ci" and len(api.service.list_keys()) == 1


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "name"]),
        ({"name": "a b"}, ["body", "name"]),
        ({"name": "a", "colour": "red"}, ["body", "colour"]),
        ({"name": "a", "rpm_limit": 0}, ["body", "rpm_limit"]),
        ({"name": "a", "tpm_limit": "100"}, ["body", "tpm_limit"]),
        ({"name": "a", "max_concurrent": 1.5}, ["body", "max_concurrent"]),
        ({"name": "a", "budget_tokens": 10}, ["body", "budget_period"]),
        ({"name": "a", "budget_period": "year", "budget_tokens": 10}, ["body", "budget_period"]),
        ({"name": "a", "models": []}, ["body", "models"]),
        ({"name": "a", "models": ["ok", "no\nnewline"]}, ["body", "models", 1]),
        ({"name": "a", "expires_at": "tomorrow"}, ["body", "expires_at"]),
        ({"name": "a", "expires_at": "2999-01-01T00:00:00"}, ["body", "expires_at"]),
        ({"name": "a", "priority": "urgent"}, ["body", "priority"]),
        ({"name": "a", "key": "sk-gw-mine"}, ["body", "key"]),
    ],
)
def test_bad_bodies_are_422_naming_the_field(api: Api, body: dict[str, Any], loc: list[Any]) -> None:
    response = api.call("POST", "/admin/keys", json=body)
    assert response.status_code == 422, response.text
    assert loc in [e["loc"] for e in response.json()["detail"]], response.json()


def test_settings_checked_against_now_and_the_registry_are_422(api: Api) -> None:
    past = api.call("POST", "/admin/keys", json={"name": "a", "expires_at": "2001-01-01T00:00:00Z"})
    assert past.status_code == 422 and past.json()["detail"].startswith("expires_at: must be in the future")
    unknown = api.call("POST", "/admin/keys", json={"name": "a", "models": ["qwen", "gpt-4"]})
    assert unknown.status_code == 422
    assert unknown.json()["detail"] == "models[1]: no model or alias is named 'gpt-4'"
    assert len(api.service.list_keys()) == 1  # nothing kept


def test_patch_changes_only_the_fields_given(api: Api) -> None:
    created = _create(api, rpm_limit=10, owner="A", budget_tokens=50, budget_period="day")
    path = f"/admin/keys/{created['id']}"
    patched = api.call("PATCH", path, json={"rpm_limit": None, "tpm_limit": 99, "models": ["qwen2"]})
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["rpm_limit"] is None and body["tpm_limit"] == 99 and body["models"] == ["qwen2"]
    assert body["owner"] == "A" and body["budget_tokens"] == 50 and "key" not in body
    assert api.tables[-1][-1].settings.tpm_limit == 99
    half = api.call("PATCH", path, json={"budget_tokens": None})
    assert half.status_code == 422 and half.json()["detail"].startswith(
        "budget_tokens: required when budget_period"
    )
    bad = api.call("PATCH", path, json={"rpm_limit": -5})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "rpm_limit"]
    extra = api.call("PATCH", path, json={"sha256": "0" * 64})
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "sha256"]
    null_name = api.call("PATCH", path, json={"name": None})
    assert null_name.status_code == 422 and null_name.json()["detail"] == "name: cannot be null"
    assert api.call("GET", path).json()["tpm_limit"] == 99  # the refusals changed nothing


def test_rotate_gives_a_new_key_and_revoke_keeps_the_record(api: Api) -> None:
    created = _create(api)
    old = created["key"]
    rotated = api.call("POST", f"/admin/keys/{created['id']}/rotate")
    assert rotated.status_code == 200
    new = rotated.json()["key"]
    assert new != old and rotated.json()["prefix"] == new[:12] and rotated.json()["id"] == created["id"]
    assert [k.sha256 for k in api.tables[-1] if k.id == created["id"]] == [key_hash(new)]

    revoked = api.call("DELETE", f"/admin/keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] and revoked.json()["active"] is False
    assert "key" not in revoked.json()
    assert all(k.id != created["id"] for k in api.tables[-1])
    assert [k["id"] for k in api.call("GET", "/admin/keys").json()["keys"]] == ["reg_ci"]
    everything = api.call("GET", "/admin/keys", params={"include_revoked": "true"}).json()["keys"]
    assert [k["id"] for k in everything] == ["reg_ci", created["id"]]
    assert (
        api.call("GET", f"/admin/keys/{created['id']}").json()["revoked_at"] == revoked.json()["revoked_at"]
    )
    assert api.call("DELETE", f"/admin/keys/{created['id']}").json() == revoked.json()  # idempotent
    assert api.call("POST", f"/admin/keys/{created['id']}/rotate").status_code == 409
    assert api.call("PATCH", f"/admin/keys/{created['id']}", json={"owner": "x"}).status_code == 409
    assert not any(new in text for text in api.seen[api.seen.index(rotated.text) + 1 :])


def test_404_409_and_bad_ids(api: Api) -> None:
    missing = "/admin/keys/key_0123456789abcdef"
    for method, path in (
        ("GET", missing),
        ("PATCH", missing),
        ("DELETE", missing),
        ("POST", f"{missing}/rotate"),
    ):
        response = api.call(method, path, json={"owner": "x"} if method == "PATCH" else None)
        assert response.status_code == 404, (method, response.text)
        assert response.json() == {"detail": "no key 'key_0123456789abcdef'"}
    for bad in (
        "/admin/keys/nope",
        "/admin/keys/key_123",
        "/admin/keys/reg_a%20b",
        "/admin/keys/key_0123456789abcdef/x",
    ):
        response = api.call("GET", bad)
        assert response.status_code == 422, (bad, response.text)
        assert "is not a key id" in response.json()["detail"]
    assert api.call("GET", "/admin/keys/key_0123456789abcdef%0A").status_code == 422  # the path gate
    assert api.call("GET", "/admin/keys", params={"include_revoked": "maybe"}).status_code == 422

    _create(api)
    taken = api.call("POST", "/admin/keys", json={"name": "team-a"})
    assert taken.status_code == 409 and "taken" in taken.json()["detail"]
    declared_name = api.call("POST", "/admin/keys", json={"name": "ci"})
    assert declared_name.status_code == 409 and "registry file" in declared_name.json()["detail"]


def test_registry_keys_are_shown_and_read_only(api: Api) -> None:
    ci = api.call("GET", "/admin/keys/reg_ci").json()
    assert ci["source"] == "registry" and ci["prefix"] is None and ci["rpm_limit"] == 5 and "sha256" not in ci
    for method, path in (
        ("PATCH", "/admin/keys/reg_ci"),
        ("DELETE", "/admin/keys/reg_ci"),
        ("POST", "/admin/keys/reg_ci/rotate"),
    ):
        response = api.call(method, path, json={"rpm_limit": 9} if method == "PATCH" else None)
        assert response.status_code == 409 and "declared in the registry file" in response.json()["detail"]
    assert api.service.get("reg_ci").settings.rpm_limit == 5


def test_a_failed_push_is_503_and_keeps_the_change_and_the_key(api: Api) -> None:
    api.fail_push[0] = True
    response = api.call("POST", "/admin/keys", json={"name": "team-a"})
    assert response.status_code == 503
    body = response.json()
    assert "stored, but pushing the key table to the gateways failed" in body["detail"]
    assert "no gateway answered" in body["detail"]
    secret = body["stored"]["key"]
    assert key_hash(secret) == api.service.get(body["stored"]["id"]).sha256  # stored, and the key not lost
    revoke = api.call("DELETE", f"/admin/keys/{body['stored']['id']}")
    assert revoke.status_code == 503 and "key" not in revoke.json()["stored"]
    api.fail_push[0] = False
    again = api.call("DELETE", f"/admin/keys/{body['stored']['id']}")  # the retry pushes again
    assert again.status_code == 200 and all(k.id != body["stored"]["id"] for k in api.tables[-1])
