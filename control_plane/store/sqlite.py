"""One way to open the control plane's SQLite file, shared by the stores that keep tables in it (admin
overlay, API keys, usage): each store has its own connection, serialised by its own lock."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import ClassVar


def open_database(path: Path | str, schema: str) -> sqlite3.Connection:
    """A connection in autocommit mode (stores run their own transactions), write-ahead logged and synced
    on every commit (a change the API confirmed survives a crash), with `schema` applied."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Used from the event loop thread and the occasional worker thread; each store serialises its use.
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    # Another store may hold the file at this moment: wait for it rather than fail.
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


class SqliteStore:
    """A store's own connection to the file (`open_database` with the class's `schema`), and the lock that
    serialises its use; `close` takes the lock, so no statement is cut by it."""

    schema: ClassVar[str] = ""

    def __init__(self, path: Path | str) -> None:
        self._db = open_database(path, self.schema)
        self._lock: threading.Lock | threading.RLock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()
