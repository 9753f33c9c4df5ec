"""Audit entries name their actor; a database written before the actor column still opens and works."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from control_plane.store.overlay import AUDIT_ACTOR, AdminStore, acting_as

pytestmark = pytest.mark.unit

OLD_SCHEMA = """
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
    detail TEXT NOT NULL);
INSERT INTO audit (at, action, target, detail) VALUES (1.0, 'model.enabled', 'qwen2', 'false');
"""


def test_an_old_database_gains_the_actor_column(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    store = AdminStore(path)
    with acting_as("admin-token"):
        store.set_flag("endpoint", "qwen2-0", "draining", True)
    store.close()
    reopened = AdminStore(path)  # the migration runs once; opening again changes nothing
    entries = reopened.audit()
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("endpoint.draining", "admin-token"),
        ("model.enabled", ""),  # written before actors were recorded
    ]
    reopened.close()


def test_the_actor_follows_the_task_that_writes() -> None:
    store = AdminStore(":memory:")

    async def write(actor: str, target: str) -> None:
        with acting_as(actor):
            await asyncio.sleep(0.01)  # interleaved with the other task
            store.set_flag("endpoint", target, "draining", True)

    async def main() -> None:
        await asyncio.gather(write("alertmanager:EndpointDown", "a"), write("admin-token", "b"))

    asyncio.run(main())
    store.set_flag("endpoint", "c", "draining", True)
    assert {(e["target"], e["actor"]) for e in store.audit()} == {
        ("a", "alertmanager:EndpointDown"),
        ("b", "admin-token"),
        ("c", "control-plane"),  # no caller named one
    }
    assert AUDIT_ACTOR.get() == "control-plane"
