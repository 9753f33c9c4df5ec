"""Where API keys are kept: a small `KeyStore` protocol, and SQLite behind it.

`SqliteKeyStore` uses its own table in the control plane's SQLite file (`var/gateway.db`, beside the
admin overlay) over its own connection: WAL and `synchronous=FULL` as the overlay, every write committed
before the call returns. Only the key's SHA-256 and its 12-character prefix are stored, never the key.
A revoked key keeps its row (`revoked_at` set), so usage history can still name it; its name may be given
to a new key.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any, Protocol

from control_plane.store.sqlite import SqliteStore
from control_plane.tenancy.errors import KeyConflict, KeyNotFound
from control_plane.tenancy.keys import ApiKey, KeySettings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, settings TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    prefix TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, revoked_at TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;
"""
_COLUMNS = "id, name, settings, sha256, prefix, created_at, updated_at, revoked_at"


class KeyStore(Protocol):
    """What the key service needs from storage; a shared database can replace SQLite behind it.

    Every method commits before it returns. Names are unique among keys not revoked (KeyConflict).
    """

    def create(self, key: ApiKey) -> None: ...

    def get(self, key_id: str) -> ApiKey | None: ...

    def list_keys(self, include_revoked: bool = False) -> list[ApiKey]: ...

    def update_settings(self, key_id: str, settings: KeySettings, now: datetime) -> ApiKey: ...

    def set_hash(self, key_id: str, sha256: str, prefix: str, now: datetime) -> ApiKey: ...

    def revoke(self, key_id: str, now: datetime) -> ApiKey: ...

    def close(self) -> None: ...


class SqliteKeyStore(SqliteStore):
    schema = _SCHEMA

    def create(self, key: ApiKey) -> None:
        row = (
            key.id,
            key.name,
            _settings_doc(key.settings),
            key.sha256,
            key.prefix,
            key.created_at.isoformat(),
            key.updated_at.isoformat(),
            key.revoked_at.isoformat() if key.revoked_at else None,
        )
        self._write(f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row, key.name)

    def get(self, key_id: str) -> ApiKey | None:
        rows = self._rows(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return _record(rows[0]) if rows else None

    def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        return [_record(r) for r in self._rows(f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY rowid")]

    def update_settings(self, key_id: str, settings: KeySettings, now: datetime) -> ApiKey:
        self._update(
            key_id,
            "name = ?, settings = ?, updated_at = ?",
            (settings.name, _settings_doc(settings), now.isoformat()),
            settings.name,
        )
        return self._must_get(key_id)

    def set_hash(self, key_id: str, sha256: str, prefix: str, now: datetime) -> ApiKey:
        self._update(key_id, "sha256 = ?, prefix = ?, updated_at = ?", (sha256, prefix, now.isoformat()), "")
        return self._must_get(key_id)

    def revoke(self, key_id: str, now: datetime) -> ApiKey:
        """Idempotent: a key revoked already keeps its first `revoked_at`."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (now.isoformat(), key_id),
            )
        if cursor.rowcount == 0:
            raise KeyNotFound(f"no key {key_id!r}")
        return self._must_get(key_id)

    def _update(self, key_id: str, assignments: str, args: tuple[Any, ...], name: str) -> None:
        # Only a key not revoked changes; a revoked one is kept as it was for the usage history.
        sql = f"UPDATE api_keys SET {assignments} WHERE id = ? AND revoked_at IS NULL"
        with self._lock:
            try:
                cursor = self._db.execute(sql, (*args, key_id))
            except sqlite3.IntegrityError:
                raise KeyConflict(f"a key named {name!r} exists already") from None
        if cursor.rowcount == 0:
            key = self.get(key_id)
            if key is None:
                raise KeyNotFound(f"no key {key_id!r}")
            raise KeyConflict(f"key {key_id!r} is revoked; create a new one")

    def _write(self, sql: str, args: tuple[Any, ...], name: str) -> None:
        with self._lock:
            try:
                self._db.execute(sql, args)  # autocommit: committed (and fsynced) when it returns
            except sqlite3.IntegrityError as exc:
                what = "hash" if "sha256" in str(exc) else "id" if ".id" in str(exc) else f"name {name!r}"
                raise KeyConflict(f"a key with this {what} exists already") from None

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _must_get(self, key_id: str) -> ApiKey:
        key = self.get(key_id)
        if key is None:
            raise KeyNotFound(f"no key {key_id!r}")
        return key


def _settings_doc(settings: KeySettings) -> str:
    return settings.model_dump_json(exclude={"name"}, exclude_defaults=True)


def _record(row: tuple[Any, ...]) -> ApiKey:
    key_id, name, settings, sha256, prefix, created_at, updated_at, revoked_at = row
    return ApiKey(
        id=key_id,
        settings=KeySettings.model_validate({**json.loads(settings), "name": name}),
        sha256=sha256,
        prefix=prefix,
        created_at=datetime.fromisoformat(created_at),
        updated_at=datetime.fromisoformat(updated_at),
        source="admin",
        revoked_at=datetime.fromisoformat(revoked_at) if revoked_at else None,
    )
