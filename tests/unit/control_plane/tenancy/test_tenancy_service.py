"""KeyService: stored and registry-declared keys under one set of names, every change audited and
announced to the listeners, a listener's failure never losing the stored change."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from control_plane.config import parse_registry
from control_plane.config.schema import Registry
from control_plane.tenancy.errors import KeyConflict, KeyIdInvalid, KeyInvalid, KeyNotFound, KeyPushError
from control_plane.tenancy.keys import ApiKey, KeyPatch, KeySettings, key_hash
from control_plane.tenancy.service import KeyService
from control_plane.tenancy.store import SqliteKeyStore

pytestmark = pytest.mark.unit

T = TypeVar("T")
START = datetime(2030, 6, 1, 12, tzinfo=UTC)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def _registry(*keys: dict[str, Any], mode: str = "api_key") -> Registry:
    return parse_registry(
        {
            "models": [
                {"id": "qwen2", "aliases": ["qwen"], "engine": "tgi"},
                {"id": "llama3", "engine": "vllm"},
            ],
            "auth": {"mode": mode, "keys": list(keys)},
        }
    )


class Harness:
    def __init__(self, db: Path) -> None:
        self.clock = Clock()
        self.audit: list[tuple[str, str, str]] = []
        self.tables: list[tuple[ApiKey, ...]] = []
        self.store = SqliteKeyStore(db)
        self.service = KeyService(self.store, audit=lambda *e: self.audit.append(e), clock=self.clock)

        async def listener(table: tuple[ApiKey, ...]) -> None:
            self.tables.append(table)

        self.service.add_listener(listener)

    def names_pushed(self) -> list[str]:
        return sorted(k.name for k in self.tables[-1])


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "gateway.db")


def test_create_get_list_and_the_secret(h: Harness) -> None:
    key, secret = run(h.service.create(KeySettings(name="team-a", models=["qwen"], rpm_limit=10)))
    assert key.sha256 == key_hash(secret) and key.prefix == secret[:12] and key.source == "admin"
    assert h.service.get(key.id) == key and h.service.list_keys() == [key]
    assert h.audit[-1][:2] == ("key.create", key.id)
    assert secret not in h.audit[-1][2] and secret[12:] not in h.audit[-1][2]
    assert '"rpm_limit":10' in h.audit[-1][2]
    assert h.names_pushed() == ["team-a"] and h.tables[-1][0].sha256 == key_hash(secret)


def test_create_refusals(h: Harness) -> None:
    run(h.service.create(KeySettings(name="team-a")))
    with pytest.raises(KeyConflict, match="taken by another key"):
        run(h.service.create(KeySettings(name="team-a")))
    with pytest.raises(KeyInvalid, match="expires_at: must be in the future"):
        run(h.service.create(KeySettings(name="b", expires_at=START)))
    run(h.service.follow(_registry()))
    with pytest.raises(KeyInvalid, match=r"models\[1\]: no model or alias is named 'gpt-4'"):
        run(h.service.create(KeySettings(name="b", models=["qwen", "gpt-4"])))
    assert [k.name for k in h.service.list_keys()] == ["team-a"]
    assert [a for a, _, _ in h.audit] == ["key.create"]  # refusals leave no trace


def test_update_is_a_patch(h: Harness) -> None:
    key, _ = run(h.service.create(KeySettings(name="team-a", rpm_limit=10, owner="A", priority="high")))
    h.clock.now += timedelta(minutes=1)
    updated = run(h.service.update(key.id, KeyPatch.model_validate({"rpm_limit": None, "tpm_limit": 99})))
    assert updated.settings.rpm_limit is None and updated.settings.tpm_limit == 99
    assert updated.settings.owner == "A" and updated.settings.priority == "high"
    assert updated.updated_at == h.clock.now and updated.created_at == START
    assert h.audit[-1] == ("key.update", key.id, '{"rpm_limit":null,"tpm_limit":99}')
    assert h.tables[-1][0].settings.tpm_limit == 99
    with pytest.raises(KeyInvalid, match="expires_at"):
        run(h.service.update(key.id, KeyPatch.model_validate({"expires_at": "2000-01-01T00:00:00Z"})))
    other, _ = run(h.service.create(KeySettings(name="team-b")))
    with pytest.raises(KeyConflict):
        run(h.service.update(other.id, KeyPatch(name="team-a")))
    renamed = run(h.service.update(other.id, KeyPatch(name="team-c")))
    assert renamed.name == "team-c"
    with pytest.raises(KeyNotFound):
        run(h.service.update("key_ffffffffffffffff", KeyPatch(owner="x")))
    with pytest.raises(KeyIdInvalid):
        run(h.service.update("nope", KeyPatch(owner="x")))


def test_revoke_and_rotate(h: Harness) -> None:
    key, old = run(h.service.create(KeySettings(name="team-a")))
    rotated, new = run(h.service.rotate(key.id))
    assert new != old and rotated.id == key.id and rotated.sha256 == key_hash(new)
    assert [k.sha256 for k in h.tables[-1]] == [key_hash(new)]  # the old key is gone from the table at once
    assert h.audit[-1] == ("key.rotate", key.id, f"name=team-a prefix={new[:12]}")
    h.clock.now += timedelta(seconds=5)
    revoked = run(h.service.revoke(key.id))
    assert revoked.revoked_at == h.clock.now and h.tables[-1] == ()
    assert h.service.list_keys() == [] and h.service.list_keys(include_revoked=True) == [revoked]
    pushes = len(h.tables)
    assert run(h.service.revoke(key.id)) == revoked  # again: same record, pushed again, audited once
    assert len(h.tables) == pushes + 1 and [a for a, *_ in h.audit].count("key.revoke") == 1
    for change in (h.service.rotate(key.id), h.service.update(key.id, KeyPatch(owner="x"))):
        with pytest.raises(KeyConflict, match="revoked"):
            run(change)
    again, _ = run(h.service.create(KeySettings(name="team-a")))  # a revoked key's name is free
    assert again.id != key.id


def test_expired_keys_leave_the_table(h: Harness) -> None:
    soon = START + timedelta(hours=1)
    run(h.service.create(KeySettings(name="a", expires_at=soon)))
    run(h.service.create(KeySettings(name="b", expires_at=soon + timedelta(hours=1))))
    run(h.service.create(KeySettings(name="c")))
    assert [k.name for k in h.service.active_keys()] == ["a", "b", "c"]
    assert h.service.next_expiry() == soon
    h.clock.now = soon
    assert [k.name for k in h.service.active_keys()] == ["b", "c"]
    assert h.service.next_expiry() == soon + timedelta(hours=1)
    assert len(h.service.list_keys()) == 3  # listed still (active: false), only Envoy drops them


def test_registry_keys_are_merged_and_read_only(h: Harness) -> None:
    ci = {"name": "ci", "sha256": key_hash("sk-gw-ci"), "rpm_limit": 5, "models": ["qwen2"]}
    run(h.service.follow(_registry(ci)))
    assert h.service.mode == "api_key"
    declared = h.service.get("reg_ci")
    assert declared.source == "registry" and declared.settings.rpm_limit == 5 and declared.prefix is None
    assert h.names_pushed() == ["ci"] and h.audit[-1] == ("key.registry", "auth.keys", "added: ci")
    stored, _ = run(h.service.create(KeySettings(name="team-a")))
    assert [k.id for k in h.service.list_keys()] == ["reg_ci", stored.id]
    assert h.names_pushed() == ["ci", "team-a"]
    with pytest.raises(KeyConflict, match="registry file"):
        run(h.service.create(KeySettings(name="ci")))
    for change in (
        h.service.update("reg_ci", KeyPatch(rpm_limit=9)),
        h.service.revoke("reg_ci"),
        h.service.rotate("reg_ci"),
    ):
        with pytest.raises(KeyConflict, match="declared in the registry file"):
            run(change)
    with pytest.raises(KeyNotFound):
        h.service.get("reg_nobody")

    # The same file again: nothing changes, nothing is pushed; a changed key keeps its id and created_at.
    pushes = len(h.tables)
    run(h.service.follow(_registry(ci)))
    assert len(h.tables) == pushes
    h.clock.now += timedelta(minutes=1)
    run(h.service.follow(_registry({**ci, "rpm_limit": 6})))
    changed = h.service.get("reg_ci")
    assert (
        changed.settings.rpm_limit == 6 and changed.created_at == START and changed.updated_at == h.clock.now
    )
    assert h.audit[-1] == ("key.registry", "auth.keys", "changed: ci")
    # Removed from the file: gone from the API and the table.
    run(h.service.follow(_registry(mode="none")))
    assert h.service.mode == "none" and h.names_pushed() == ["team-a"]
    with pytest.raises(KeyNotFound):
        h.service.get("reg_ci")


def test_a_declared_key_clashing_with_a_stored_one_waits(h: Harness) -> None:
    stored, secret = run(h.service.create(KeySettings(name="team-a")))
    run(h.service.follow(_registry({"name": "team-a", "sha256": key_hash("sk-gw-other")})))
    assert h.service.list_keys() == [stored]  # the key handed out first keeps working
    assert h.service.warnings == [
        "registry key 'team-a' skipped: a key made through the admin API has its name"
    ]
    run(h.service.follow(_registry({"name": "copy", "sha256": key_hash(secret)})))
    assert "has its hash" in h.service.warnings[0]
    run(h.service.revoke(stored.id))
    run(h.service.follow(_registry({"name": "team-a", "sha256": key_hash("sk-gw-other")})))
    assert [k.id for k in h.service.active_keys()] == ["reg_team-a"] and h.service.warnings == []


def test_a_failing_listener_keeps_the_change_and_surfaces(h: Harness) -> None:
    calls: list[int] = []

    async def broken(table: tuple[ApiKey, ...]) -> None:
        calls.append(len(table))
        raise RuntimeError("xds push failed")

    h.service.add_listener(broken)
    with pytest.raises(KeyPushError, match=r"was created and stored.*RuntimeError: xds push failed") as info:
        run(h.service.create(KeySettings(name="team-a")))
    key, secret = info.value.record, info.value.secret
    assert secret is not None and key.sha256 == key_hash(secret)  # the clear key is not lost
    assert h.service.get(key.id) == key and h.audit[-1][0] == "key.create"
    assert len(h.tables) == 1  # the other listener still ran
    with pytest.raises(KeyPushError) as info:
        run(h.service.rotate(key.id))
    assert info.value.secret is not None and h.service.get(key.id).sha256 == key_hash(info.value.secret)
    with pytest.raises(KeyPushError, match="revoked"):
        run(h.service.revoke(key.id))
    assert h.service.get(key.id).revoked_at is not None
    # A registry reload only logs it: the reload went through.
    run(h.service.follow(_registry({"name": "ci", "sha256": key_hash("sk-gw-ci")})))
    assert h.service.get("reg_ci").source == "registry" and calls == [1, 1, 0, 1]


def test_changes_are_serialised_for_the_listeners(h: Harness) -> None:
    seen: list[int] = []

    async def slow(table: tuple[ApiKey, ...]) -> None:
        await asyncio.sleep(0.01)
        seen.append(len(table))

    h.service.add_listener(slow)

    async def many() -> None:
        await asyncio.gather(*(h.service.create(KeySettings(name=f"k{i}")) for i in range(20)))

    run(many())
    assert seen == list(range(1, 21))  # each push saw the table after its own change, in order


def test_state_survives_a_restart(tmp_path: Path) -> None:
    first = Harness(tmp_path / "gateway.db")
    key, secret = run(first.service.create(KeySettings(name="team-a", tpm_limit=100)))
    run(first.service.update(key.id, KeyPatch(owner="Team A")))
    gone, _ = run(first.service.create(KeySettings(name="old")))
    run(first.service.revoke(gone.id))
    first.store.close()
    second = Harness(tmp_path / "gateway.db")
    restored = second.service.get(key.id)
    assert restored.settings.owner == "Team A" and restored.sha256 == key_hash(secret)
    assert [k.name for k in second.service.active_keys()] == ["team-a"]
    assert second.service.get(gone.id).revoked_at is not None


def test_audit_details_never_hold_a_secret(h: Harness) -> None:
    made = []
    key, secret = run(h.service.create(KeySettings(name="a")))
    made.append(secret)
    for _ in range(3):
        made.append(run(h.service.rotate(key.id))[1])
    run(h.service.update(key.id, KeyPatch(owner="o")))
    run(h.service.revoke(key.id))
    text = repr(h.audit)
    assert all(s not in text and s[12:] not in text for s in made)
    assert all(key_hash(s) not in text for s in made)
