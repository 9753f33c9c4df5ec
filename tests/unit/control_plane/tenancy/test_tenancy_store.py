"""SQLite key store: every write kept across a restart, names unique among live keys, revoked keys kept,
and no clear key anywhere in the database files."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from control_plane.store.overlay import AdminStore
from control_plane.tenancy.errors import KeyConflict, KeyNotFound
from control_plane.tenancy.keys import ApiKey, KeySettings, key_hash, new_key_id, new_secret, secret_prefix
from control_plane.tenancy.store import KeyStore, SqliteKeyStore

pytestmark = pytest.mark.unit

NOW = datetime(2030, 6, 1, 12, tzinfo=UTC)


def _new(name: str, secret: str | None = None, **settings: object) -> tuple[ApiKey, str]:
    secret = secret or new_secret()
    key = ApiKey(
        new_key_id(),
        KeySettings.model_validate({"name": name, **settings}),
        key_hash(secret),
        secret_prefix(secret),
        NOW,
        NOW,
    )
    return key, secret


def test_create_get_list_and_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "var" / "gateway.db"
    store: KeyStore = SqliteKeyStore(db)
    a, _ = _new("team-a", rpm_limit=60, models=["qwen2"], expires_at=NOW + timedelta(days=1))
    b, _ = _new("team-b", budget_tokens=100, budget_period="month", priority="low", owner="Bob")
    store.create(a)
    store.create(b)
    assert store.get(a.id) == a
    store.close()

    reopened = SqliteKeyStore(db)  # a restarted control plane
    assert reopened.list_keys() == [a, b]
    assert reopened.get(b.id) == b and reopened.get("key_ffffffffffffffff") is None
    reopened.close()


def test_updates_rotations_and_revocations_are_kept(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store = SqliteKeyStore(db)
    key, _ = _new("team-a", rpm_limit=60)
    store.create(key)
    later = NOW + timedelta(minutes=5)
    updated = store.update_settings(key.id, KeySettings(name="team-a2", tpm_limit=5), later)
    assert updated.name == "team-a2" and updated.settings.rpm_limit is None and updated.updated_at == later
    new = new_secret()
    rotated = store.set_hash(key.id, key_hash(new), secret_prefix(new), later)
    assert rotated.sha256 == key_hash(new) and rotated.prefix == new[:12] and rotated.created_at == NOW
    revoked = store.revoke(key.id, later + timedelta(minutes=1))
    assert revoked.revoked_at == later + timedelta(minutes=1)
    assert store.revoke(key.id, later + timedelta(hours=9)).revoked_at == revoked.revoked_at  # idempotent
    store.close()

    reopened = SqliteKeyStore(db)
    assert reopened.list_keys() == []  # revoked keys are hidden...
    assert reopened.list_keys(include_revoked=True) == [revoked]  # ...but kept
    # A revoked key does not change any more.
    with pytest.raises(KeyConflict, match="revoked"):
        reopened.update_settings(key.id, KeySettings(name="x"), later)
    with pytest.raises(KeyConflict, match="revoked"):
        reopened.set_hash(key.id, "0" * 64, "sk-gw-000000", later)
    for call in (
        lambda: reopened.update_settings("key_ffffffffffffffff", KeySettings(name="x"), later),
        lambda: reopened.set_hash("key_ffffffffffffffff", "0" * 64, "p", later),
        lambda: reopened.revoke("key_ffffffffffffffff", later),
    ):
        with pytest.raises(KeyNotFound):
            call()


def test_names_are_unique_among_live_keys(tmp_path: Path) -> None:
    store = SqliteKeyStore(tmp_path / "gateway.db")
    first, _ = _new("team-a")
    store.create(first)
    with pytest.raises(KeyConflict, match="name 'team-a'"):
        store.create(_new("team-a")[0])
    other, _ = _new("team-b")
    store.create(other)
    with pytest.raises(KeyConflict, match="team-a"):
        store.update_settings(other.id, KeySettings(name="team-a"), NOW)
    store.revoke(first.id, NOW)
    again, _ = _new("team-a")  # the name of a revoked key may be given again
    store.create(again)
    assert [k.id for k in store.list_keys(include_revoked=True)] == [first.id, other.id, again.id]
    assert [k.id for k in store.list_keys()] == [other.id, again.id]


def test_no_clear_key_is_written_to_the_database(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store = SqliteKeyStore(db)
    secrets_made = []
    for i in range(20):
        key, secret = _new(f"k{i}")
        store.create(key)
        secrets_made.append(secret)
        new = new_secret()
        store.set_hash(key.id, key_hash(new), secret_prefix(new), NOW)
        secrets_made.append(new)
    # Read every file SQLite wrote (the database, its WAL and shared memory) before and after closing.
    for moment in ("open", "closed"):
        if moment == "closed":
            store.close()
        files = list(tmp_path.glob("gateway.db*"))
        assert files
        raw = b"".join(f.read_bytes() for f in files)
        for secret in secrets_made:
            assert secret.encode() not in raw, moment
            assert secret[12:].encode() not in raw  # nor the part after the prefix
        assert key_hash(secrets_made[-1]).encode() in raw  # the hash is what is kept


def test_shares_the_admin_stores_file(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    admin = AdminStore(db)
    keys = SqliteKeyStore(db)
    key, _ = _new("team-a")
    keys.create(key)
    admin.write([], "model.add", "m", "")  # both connections write the same file
    assert keys.get(key.id) == key and admin.audit(1)[0]["action"] == "model.add"
    admin.close()
    keys.close()


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    store = SqliteKeyStore(tmp_path / "gateway.db")

    def work(worker: int) -> None:
        for i in range(25):
            store.create(_new(f"w{worker}-{i}")[0])

    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(work, w) for w in range(4)]:
            done.result(timeout=60)  # re-raises a worker's error
    assert len(store.list_keys()) == 100
    store.close()
