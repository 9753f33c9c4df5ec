"""Admin API: usage per API key over a time window, and the keys that used the most tokens.

    GET /admin/keys/{id}/usage?since=1h&until=&by=model|minute|hour|day
    GET /admin/usage/top?window=1h&limit=10

Times are ISO 8601 (a time without a zone is UTC) or a span back from now (`90s`, `15m`, `1h`, `7d`);
counts are kept per minute, so a window starts at its minute. Unknown key 404; an id no key can have,
a bad time, `since` not before `until`, or more rows than MAX_ROWS asked for 422 (`detail` names the
parameter). Register these routes before the key routes: `/admin/keys/{id:path}` would take the path.
The handlers are coroutines: they read the accounting's counts on the event loop that updates them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request, status
from fastapi.params import Depends
from fastapi.responses import JSONResponse

from control_plane.tenancy.errors import KeyIdInvalid, KeyNotFound
from control_plane.tenancy.service import KeyService
from control_plane.tenancy.usage import UsageAccounting
from control_plane.tenancy.usage_store import BUCKET_SECONDS, Counts

MAX_ROWS = 10_000
MAX_TOP = 100
_SPAN = re.compile(r"(\d{1,9})([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageParamError(ValueError):
    """A query parameter that cannot be read (422, naming it)."""


def parse_span(name: str, value: str) -> int:
    match = _SPAN.fullmatch(value.strip())
    if match is None or int(match.group(1)) == 0:
        raise UsageParamError(f"{name}: {value!r} is not a span like 90s, 15m, 1h or 7d")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def parse_time(name: str, value: str, now: float) -> float:
    """ISO 8601 (UTC without a zone) or a span back from `now`."""
    if _SPAN.fullmatch(value.strip()):
        return now - parse_span(name, value)
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UsageParamError(
            f"{name}: {value!r} is neither ISO 8601 (2030-01-01T00:00:00Z) nor a span like 1h"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _total(groups: dict[str | int, Counts]) -> Counts:
    total = Counts()
    for counts in groups.values():
        total.add(counts)
    return total


def register_usage_routes(
    app: FastAPI,
    usage: UsageAccounting,
    keys: KeyService,
    *,
    retention_days: int,
    dependencies: Sequence[Depends] | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    router = APIRouter(dependencies=list(dependencies or []), tags=["usage"])
    oldest_s = retention_days * 86400

    def window(since: str, until: str | None) -> tuple[int, int]:
        now = clock()
        start = parse_time("since", since, now)
        end = parse_time("until", until, now) if until else now
        if start >= end:
            raise UsageParamError(f"since: must be before until ({_iso(start)} >= {_iso(end)})")
        # Minute rows: a window starts at its minute and takes in the minute it ends in.
        first = int(start) - int(start) % 60
        last = int(end) - int(end) % 60 + (60 if end % 60 else 0)
        return max(first, int(now) - oldest_s - 60), last

    @router.get("/admin/keys/{key_id}/usage")
    async def key_usage(
        key_id: str,
        since: str = Query("24h", description="ISO 8601 or a span back from now (90s, 15m, 1h, 7d)."),
        until: str | None = Query(None, description="ISO 8601 or a span back from now; default now."),
        by: Literal["model", "minute", "hour", "day"] = "model",
    ) -> dict[str, Any]:
        """A key's requests, tokens, errors and 429s in the window, in total and per model or time."""
        key = keys.get(key_id)  # 422 for an impossible id, 404 for an unknown one
        first, last = window(since, until)
        if by != "model" and (last - first) // BUCKET_SECONDS[by] > MAX_ROWS:
            raise UsageParamError(f"by: more than {MAX_ROWS} rows by {by}; choose a coarser one")
        groups = usage.summary(key.id, first, last, by)
        ordered = sorted(groups.items(), key=lambda g: str(g[0]) if by == "model" else int(g[0]))
        if by == "model":
            rows = [{"model": m, **c.view()} for m, c in ordered]
        else:
            rows = [{"start": _iso(int(t)), **c.view()} for t, c in ordered]
        return {
            "key_id": key.id,
            "key_name": key.name,
            "since": _iso(first),
            "until": _iso(last),
            "by": by,
            "totals": _total(groups).view(),
            "rows": rows,
        }

    @router.get("/admin/usage/top")
    async def top_keys(
        window_span: str = Query("1h", alias="window", description="A span back from now: 15m, 1h, 7d."),
        limit: int = Query(10, ge=1, le=MAX_TOP),
    ) -> dict[str, Any]:
        """The keys that used the most tokens (prompt + completion) in the window, most first."""
        if parse_span("window", window_span) > oldest_s:
            raise UsageParamError(f"window: at most the retention, {retention_days}d")
        first, last = window(window_span, None)
        groups = usage.summary(None, first, last, "key")
        names = {k.id: k.name for k in keys.list_keys(include_revoked=True)}
        ranked = sorted(groups.items(), key=lambda g: (-g[1].tokens, -g[1].requests, str(g[0])))[:limit]
        return {
            "window": window_span,
            "since": _iso(first),
            "until": _iso(last),
            "keys": [{"key_id": k, "key_name": names.get(str(k)), **c.view()} for k, c in ranked],
        }

    async def param_error(request: Request, exc: Exception) -> JSONResponse:
        code = status.HTTP_422_UNPROCESSABLE_CONTENT
        if isinstance(exc, KeyNotFound):
            code = status.HTTP_404_NOT_FOUND
        return JSONResponse({"detail": str(exc)}, status_code=code)

    # The key routes map the key errors the same way; mapped here too so these routes stand alone.
    for error_type in (UsageParamError, KeyNotFound, KeyIdInvalid):
        app.add_exception_handler(error_type, param_error)
    app.include_router(router)
    return app
