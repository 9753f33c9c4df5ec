"""Where usage is kept: per key, model and minute (UTC), behind a small `UsageStore` protocol; SQLite here.

`SqliteUsageStore` has its own table (`key_usage`) in the control plane's SQLite file (`var/gateway.db`)
over its own connection, like the key store: WAL, `synchronous=FULL`, each `add` one transaction that
adds to the rows already there (so a flush may repeat a minute: the counts add up). Rows older than the
retention are deleted by `prune`. A shared database can replace SQLite behind the protocol (several
control planes would then add to the same rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

from control_plane.store.sqlite import SqliteStore

Grouping = Literal["model", "minute", "hour", "day", "key"]
BUCKET_SECONDS: Mapping[str, int] = {"minute": 60, "hour": 3600, "day": 86400}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_usage (
    key_id TEXT NOT NULL, model TEXT NOT NULL, minute INTEGER NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    errors INTEGER NOT NULL, rate_limited INTEGER NOT NULL, estimated INTEGER NOT NULL,
    PRIMARY KEY (key_id, minute, model));
CREATE INDEX IF NOT EXISTS key_usage_minute ON key_usage (minute);
"""


@dataclass
class Counts:
    """What is counted per key, model and minute."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0  # status >= 400 other than 429
    rate_limited: int = 0  # 429
    estimated: int = 0  # requests charged their max_tokens: the engine reported no usage

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Counts) -> None:
        for name in _COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in _COUNT_FIELDS)

    def view(self) -> dict[str, int]:
        return {**{name: getattr(self, name) for name in _COUNT_FIELDS}, "total_tokens": self.tokens}


_COUNT_FIELDS = tuple(f.name for f in fields(Counts))
_COUNT_COLUMNS = ", ".join(_COUNT_FIELDS)
_SUMS = ", ".join(f"SUM({name})" for name in _COUNT_FIELDS)


@dataclass(frozen=True)
class UsageRow:
    key_id: str
    model: str  # a model id, or (unknown) / (none)
    minute: int  # epoch seconds of the minute's start (UTC)
    counts: Counts


def group_of(row: UsageRow, by: Grouping) -> str | int:
    """The row's group: its model or key, or the start of its time bucket (epoch seconds)."""
    if by == "model":
        return row.model
    if by == "key":
        return row.key_id
    size = BUCKET_SECONDS[by]
    return row.minute - row.minute % size


class UsageStore(Protocol):
    """What the usage accounting needs from storage. `add` commits before it returns and adds to the
    counts already kept for the same key, model and minute. Times are epoch seconds; `since` inclusive,
    `until` exclusive, compared with the minute's start."""

    def add(self, rows: Iterable[UsageRow]) -> None: ...

    def summary(
        self, key_id: str | None, since: int, until: int, by: Grouping
    ) -> dict[str | int, Counts]: ...

    def daily_tokens(self, since: int) -> dict[tuple[str, int], int]:
        """Tokens (prompt + completion) per (key id, day start) from `since` on: the budgets' base."""
        ...

    def key_tokens(self, since: int) -> dict[str, int]:
        """Tokens (prompt + completion) per key id from `since` on: the tokens-per-minute window's base."""
        ...

    def prune(self, before: int) -> int: ...

    def close(self) -> None: ...


class SqliteUsageStore(SqliteStore):
    schema = _SCHEMA

    def add(self, rows: Iterable[UsageRow]) -> None:
        params = [(r.key_id, r.model, r.minute, *r.counts.as_tuple()) for r in rows]
        if not params:
            return
        updates = ", ".join(f"{name} = {name} + excluded.{name}" for name in _COUNT_FIELDS)
        sql = (
            f"INSERT INTO key_usage (key_id, model, minute, {_COUNT_COLUMNS}) "
            f"VALUES (?, ?, ?, {', '.join('?' * len(_COUNT_FIELDS))}) "
            f"ON CONFLICT (key_id, minute, model) DO UPDATE SET {updates}"
        )
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def summary(self, key_id: str | None, since: int, until: int, by: Grouping) -> dict[str | int, Counts]:
        if by in BUCKET_SECONDS:
            size = BUCKET_SECONDS[by]
            group = f"minute - minute % {size}"
        else:
            group = "model" if by == "model" else "key_id"
        where = "minute >= ? AND minute < ?"
        args: tuple[Any, ...] = (since, until)
        if key_id is not None:
            where += " AND key_id = ?"
            args = (*args, key_id)
        sql = f"SELECT {group}, {_SUMS} FROM key_usage WHERE {where} GROUP BY 1"
        return {row[0]: Counts(*row[1:]) for row in self._rows(sql, args)}

    def daily_tokens(self, since: int) -> dict[tuple[str, int], int]:
        sql = (
            "SELECT key_id, minute - minute % 86400, SUM(prompt_tokens + completion_tokens) "
            "FROM key_usage WHERE minute >= ? GROUP BY 1, 2"
        )
        return {(key_id, day): tokens for key_id, day, tokens in self._rows(sql, (since,))}

    def key_tokens(self, since: int) -> dict[str, int]:
        sql = (
            "SELECT key_id, SUM(prompt_tokens + completion_tokens) FROM key_usage "
            "WHERE minute >= ? GROUP BY 1"
        )
        return {key_id: tokens for key_id, tokens in self._rows(sql, (since,))}

    def prune(self, before: int) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM key_usage WHERE minute < ?", (before,)).rowcount

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())
