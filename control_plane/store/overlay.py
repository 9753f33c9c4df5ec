"""The admin overlay: run-time additions, removals and flags, persisted in SQLite and layered over the
registry file.

Rules of the layering (`AdminStore.apply`):
- models and endpoints added through the admin API are added to the file's; a name that the file itself
  defines wins (the admin addition is skipped, with a warning);
- removing a model or endpoint that the file defines leaves a tombstone, so it stays removed across file
  reloads and restarts until it is added again through the API;
- flags (model enabled/disabled, model or endpoint draining) override the file.
Every write is committed before the call returns, so a restarted control plane comes back the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from control_plane.config.loader import parse_registry, validation_problems
from control_plane.config.schema import EndpointConfig, ModelConfig, Registry
from control_plane.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

# Who makes the changes the current task writes, for the audit log: "admin-token" (admin API),
# "alertmanager:<alertname>" (alert receiver), "registry-file" (file reload). A context variable rather
# than a parameter, so every write path records it without each layer in between passing it on;
# asyncio tasks and worker threads started from the task inherit it.
AUDIT_ACTOR: ContextVar[str] = ContextVar("audit_actor", default="control-plane")


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    token = AUDIT_ACTOR.set(actor)
    try:
        yield
    finally:
        AUDIT_ACTOR.reset(token)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS added_models (id TEXT PRIMARY KEY, doc TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS added_endpoints (
    id TEXT PRIMARY KEY, model_id TEXT NOT NULL, doc TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS removed (kind TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS flags (
    kind TEXT NOT NULL, id TEXT NOT NULL, flag TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (kind, id, flag));
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
    detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, status TEXT NOT NULL,
    alertname TEXT NOT NULL, fingerprint TEXT NOT NULL, labels TEXT NOT NULL, annotations TEXT NOT NULL,
    starts_at TEXT NOT NULL, ends_at TEXT NOT NULL, action TEXT);
CREATE TABLE IF NOT EXISTS auto_actions (
    endpoint_id TEXT NOT NULL, alertname TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (endpoint_id, alertname));
"""


@dataclass(frozen=True)
class Flags:
    disabled_models: frozenset[str] = frozenset()
    enabled_models: frozenset[str] = frozenset()  # explicitly enabled, over a file's `enabled: false`
    draining_models: frozenset[str] = frozenset()
    draining_endpoints: frozenset[str] = frozenset()


@dataclass
class Applied:
    registry: Registry
    warnings: list[str] = field(default_factory=list)
    admin_models: frozenset[str] = frozenset()
    admin_endpoints: frozenset[str] = frozenset()


class AdminStore(SqliteStore):
    schema = _SCHEMA

    def __init__(self, path: Path | str) -> None:
        super().__init__(path)
        # Databases written before audit entries named their actor gain the column (old rows: '').
        if "actor" not in {row[1] for row in self._db.execute("PRAGMA table_info(audit)")}:
            self._db.execute("ALTER TABLE audit ADD COLUMN actor TEXT NOT NULL DEFAULT ''")
        # Re-entrant: `preview` holds it around writes and reads that take it again.
        self._lock = threading.RLock()

    def write(
        self, statements: list[tuple[str, tuple[Any, ...]]], action: str, target: str, detail: str
    ) -> None:
        """Run `statements` in one transaction, with an audit row saying what was done to what, by whom
        (`AUDIT_ACTOR`)."""
        with self._lock:
            # A savepoint, not BEGIN: outside a transaction it is one (committed by RELEASE), inside a
            # `preview` it nests and is undone with it.
            self._db.execute("SAVEPOINT write")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute(
                    "INSERT INTO audit (at, action, target, detail, actor) VALUES (?, ?, ?, ?, ?)",
                    (time.time(), action, target, detail, AUDIT_ACTOR.get()),
                )
                self._db.execute("RELEASE write")
            except sqlite3.Error:
                self._db.execute("ROLLBACK TO write")
                self._db.execute("RELEASE write")
                raise

    @contextlib.contextmanager
    def preview(self) -> Iterator[None]:
        """Writes made inside are seen by reads inside (`apply`, `flags`) and all undone on exit: the
        control plane validates a change on what it would make before anything is stored."""
        with self._lock:
            self._db.execute("SAVEPOINT preview")
            try:
                yield
            finally:
                self._db.execute("ROLLBACK TO preview")
                self._db.execute("RELEASE preview")

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # Models and endpoints
    def add_model(self, model: ModelConfig) -> None:
        doc = model.model_dump_json(exclude_defaults=True)
        self.write(
            [
                ("DELETE FROM removed WHERE kind = 'model' AND id = ?", (model.id,)),
                (
                    "INSERT OR REPLACE INTO added_models (id, doc, seq) VALUES (?, ?, "
                    "(SELECT COALESCE(MAX(seq), 0) + 1 FROM added_models))",
                    (model.id, doc),
                ),
            ],
            "model.add",
            model.id,
            doc,
        )

    def remove_model(self, model_id: str, from_file: bool) -> None:
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("DELETE FROM added_models WHERE id = ?", (model_id,)),
            ("DELETE FROM added_endpoints WHERE model_id = ?", (model_id,)),
            ("DELETE FROM flags WHERE kind = 'model' AND id = ?", (model_id,)),
        ]
        if from_file:
            statements.append(("INSERT OR IGNORE INTO removed (kind, id) VALUES ('model', ?)", (model_id,)))
        self.write(statements, "model.remove", model_id, "")

    def add_endpoint(self, model_id: str, endpoint: EndpointConfig) -> None:
        assert endpoint.id is not None, "admin-added endpoints carry an explicit id"
        doc = endpoint.model_dump_json(exclude_defaults=True)
        self.write(
            [
                ("DELETE FROM removed WHERE kind = 'endpoint' AND id = ?", (endpoint.id,)),
                (
                    "INSERT OR REPLACE INTO added_endpoints (id, model_id, doc, seq) VALUES (?, ?, ?, "
                    "(SELECT COALESCE(MAX(seq), 0) + 1 FROM added_endpoints))",
                    (endpoint.id, model_id, doc),
                ),
            ],
            "endpoint.add",
            endpoint.id,
            f"{model_id} {doc}",
        )

    def remove_endpoint(self, endpoint_id: str, from_file: bool) -> None:
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("DELETE FROM added_endpoints WHERE id = ?", (endpoint_id,)),
            ("DELETE FROM flags WHERE kind = 'endpoint' AND id = ?", (endpoint_id,)),
        ]
        if from_file:
            statements.append(
                ("INSERT OR IGNORE INTO removed (kind, id) VALUES ('endpoint', ?)", (endpoint_id,))
            )
        self.write(statements, "endpoint.remove", endpoint_id, "")

    # Flags
    def set_flag(self, kind: str, target: str, flag: str, value: bool | None) -> None:
        """Set a flag, or clear it (None) so the file's value applies again."""
        statement: tuple[str, tuple[Any, ...]]
        if value is None:
            statement = ("DELETE FROM flags WHERE kind = ? AND id = ? AND flag = ?", (kind, target, flag))
        else:
            statement = (
                "INSERT OR REPLACE INTO flags (kind, id, flag, value) VALUES (?, ?, ?, ?)",
                (kind, target, flag, int(value)),
            )
        self.write([statement], f"{kind}.{flag}", target, "" if value is None else str(value).lower())

    def flags(self) -> Flags:
        rows = self.rows("SELECT kind, id, flag, value FROM flags")
        return Flags(
            disabled_models=frozenset(i for k, i, f, v in rows if k == "model" and f == "enabled" and not v),
            enabled_models=frozenset(i for k, i, f, v in rows if k == "model" and f == "enabled" and v),
            draining_models=frozenset(i for k, i, f, v in rows if k == "model" and f == "draining" and v),
            draining_endpoints=frozenset(
                i for k, i, f, v in rows if k == "endpoint" and f == "draining" and v
            ),
        )

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.rows(
            "SELECT at, action, target, detail, actor FROM audit ORDER BY seq DESC LIMIT ?", (limit,)
        )
        return [
            {"at": at, "action": a, "target": t, "detail": d, "actor": actor}
            for at, a, t, d, actor in rows
        ]

    # Layering
    def apply(self, base: Registry) -> Applied:
        """The effective registry: the file's, with the overlay's additions, removals and flags."""
        warnings: list[str] = []
        removed_models = {i for (i,) in self.rows("SELECT id FROM removed WHERE kind = 'model'")}
        removed_endpoints = {i for (i,) in self.rows("SELECT id FROM removed WHERE kind = 'endpoint'")}
        flags = self.flags()

        models: list[dict[str, Any]] = []
        names: set[str] = set()
        endpoint_ids: set[str] = set()
        for model in base.models:
            if model.id in removed_models:
                continue
            doc = model.model_dump(mode="json", exclude_defaults=True)
            # File endpoints get their final ids now, so admin endpoints and tombstones can refer to them.
            doc["endpoints"] = [
                {**ep.model_dump(mode="json", exclude_defaults=True), "id": model.endpoint_id(i)}
                for i, ep in enumerate(model.endpoints)
                if model.endpoint_id(i) not in removed_endpoints
            ]
            models.append(doc)
            names.update(model.names)
            endpoint_ids.update(model.endpoint_id(i) for i in range(len(model.endpoints)))

        admin_models = set()
        for (doc_text,) in self.rows("SELECT doc FROM added_models ORDER BY seq"):
            doc = json.loads(doc_text)
            problem = _invalid(ModelConfig, doc)
            if problem:
                # Stored before today's rules (e.g. a newline in a name): skipped, not fatal.
                warnings.append(f"admin-added model {doc.get('id')!r} skipped: {problem}")
                continue
            clash = {doc["id"], *doc.get("aliases", [])} & names
            if clash:
                warnings.append(f"admin-added model {doc['id']!r} skipped: the file defines {sorted(clash)}")
                continue
            doc["endpoints"] = [e for e in doc.get("endpoints", []) if e.get("id") not in endpoint_ids]
            endpoint_ids.update(e["id"] for e in doc["endpoints"] if e.get("id"))
            models.append(doc)
            names.update({doc["id"], *doc.get("aliases", [])})
            admin_models.add(doc["id"])

        by_id = {m["id"]: m for m in models}
        admin_endpoints = set()
        for endpoint_id, model_id, doc_text in self.rows(
            "SELECT id, model_id, doc FROM added_endpoints ORDER BY seq"
        ):
            if model_id not in by_id:
                warnings.append(f"admin-added endpoint {endpoint_id!r} skipped: no model {model_id!r}")
                continue
            if endpoint_id in endpoint_ids:
                warnings.append(f"admin-added endpoint {endpoint_id!r} skipped: the id is taken")
                continue
            problem = _invalid(EndpointConfig, json.loads(doc_text))
            if problem:
                warnings.append(f"admin-added endpoint {endpoint_id!r} skipped: {problem}")
                continue
            by_id[model_id].setdefault("endpoints", []).append(json.loads(doc_text))
            endpoint_ids.add(endpoint_id)
            admin_endpoints.add(endpoint_id)

        for doc in models:
            if doc["id"] in flags.disabled_models:
                doc["enabled"] = False
            elif doc["id"] in flags.enabled_models:
                doc["enabled"] = True

        document = base.model_dump(mode="json", exclude_defaults=True, exclude={"models"})
        document["models"] = models
        for warning in warnings:
            log.warning("%s", warning)
        return Applied(
            registry=parse_registry(document, "registry + admin changes", allow_empty=True),
            warnings=warnings,
            admin_models=frozenset(admin_models),
            admin_endpoints=frozenset(admin_endpoints),
        )


def _invalid(kind: type[ModelConfig] | type[EndpointConfig], doc: Any) -> str | None:
    """Why a stored admin entry no longer validates, or None."""
    try:
        kind.model_validate(doc)
    except ValidationError as exc:
        return "; ".join(validation_problems(exc))
    return None
