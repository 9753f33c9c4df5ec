"""Token limits enforced from the usage accounting: tokens per minute (`tpm_limit`) and budgets
(`budget_tokens` per UTC `budget_period`), through the key table's refusals (KeyPublisher.deny).

`TokenLimits` keeps, per key, a sliding 60 s window of tokens (prompt + completion, in whole-second
buckets, timed when the access-log entry arrives: a stream's tokens are known at its end) and the tokens
of each UTC day of the current month (from the store at start, then counted). At start the window is
seeded from the store too (`seed_since`: the last two minute rows, counted as used at the start), so a
restart gives no key a fresh minute. It says what a key's state should be (`wanted`):
- budget: the period's tokens >= `budget_tokens` → `insufficient_quota` until the period ends;
- tokens per minute: the window's tokens >= `tpm_limit` → `rate_limit_exceeded` until enough of the window
  has expired to be under the limit again (the budget wins when both hold).

`DenialWorker` brings the key table in line: one task, fed the keys whose state may have changed, pushes
only a change (a new refusal, a later or different one, or a lift when a key's limit was raised or
removed), one key at a time, so the access-log consumer never waits for a push and a burst of entries
for one key costs at most one push in flight and one after it. A refusal ends by itself in Envoy when its
time passes (the key check compares Envoy's clock), and the publisher drops expired refusals at its
next push: no lift is pushed for that.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from control_plane.tenancy.keys import KeySettings
from control_plane.tenancy.publish import Denial, KeyPublisher

log = logging.getLogger(__name__)

WINDOW_S = 60
TPM_CODE = "rate_limit_exceeded"
BUDGET_CODE = "insufficient_quota"
# A refusal pushed already is lifted early (limit raised, budget grown) only if it had this long to run.
LIFT_MARGIN_S = 2.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class Wanted:
    code: str
    until: float  # epoch seconds

    def published_as(self) -> Denial:
        """As KeyPublisher.deny will keep it (whole seconds, rounded up)."""
        return Denial(self.code, int(self.until) + 1)


def day_start(at: float) -> int:
    return int(at) - int(at) % 86400


def month_start(at: float) -> int:
    moment = datetime.fromtimestamp(at, UTC)
    return calendar.timegm((moment.year, moment.month, 1, 0, 0, 0))


def seed_since(at: float) -> int:
    """The first minute row whose tokens seed the window at `at`: the previous minute's (the rows are
    by start minute, and the 60 s before `at` overlap this minute and the one before)."""
    return int(at) - int(at) % 60 - 60


def period_end(period: str, at: float) -> int:
    if period == "day":
        return day_start(at) + 86400
    moment = datetime.fromtimestamp(at, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


class TokenLimits:
    """Per key: the last minute's tokens and this month's tokens per day. Event-loop only."""

    def __init__(
        self,
        daily: Mapping[tuple[str, int], int] | None = None,
        clock: Clock = time.time,
        recent: Mapping[str, int] | None = None,
    ) -> None:
        """`daily`: tokens per (key id, day start) of this month; `recent`: tokens per key id of the minute
        rows from `seed_since(clock())` on (a restart's store)."""
        self._clock = clock
        self._window: dict[str, deque[list[int]]] = {}  # key id → [second, tokens] buckets, oldest first
        self._window_sum: dict[str, int] = {}
        # The store keeps tokens by the minute a request started, not when its entry arrived (which is
        # what the window counts); an entry of either minute may have arrived as late as just before the
        # restart (a stream ends when it ends). So the two rows' tokens count as used at the start
        # second: never fewer than the last 60 s held, at the cost of a refusal lasting up to about a
        # minute longer than it would have without the restart. Spreading them over their minutes would
        # expire tokens that may have arrived last, letting a key that used its limit just before the
        # restart through again. (A stream that started before the previous minute and ended in the
        # last 60 s is missed: older rows are not read, as they hold mostly tokens long expired.)
        second = int(clock())
        for key_id, tokens in (recent or {}).items():
            if tokens > 0:
                self._window[key_id] = deque([[second, tokens]])
                self._window_sum[key_id] = tokens
        self._month = month_start(clock())
        self._days: dict[str, dict[int, int]] = {}  # key id → day start → tokens (this month only)
        for (key_id, day), tokens in (daily or {}).items():
            if day >= self._month:
                self._days.setdefault(key_id, {})[day] = tokens

    def add(self, key_id: str, tokens: int, day_of: float) -> None:
        """`tokens` used by `key_id` now, in a request of the day holding `day_of` (its start time)."""
        if tokens <= 0:
            return
        now = self._clock()
        second = int(now)
        window = self._window.setdefault(key_id, deque())
        if window and window[-1][0] == second:
            window[-1][1] += tokens
        else:
            window.append([second, tokens])
        self._window_sum[key_id] = self._window_sum.get(key_id, 0) + tokens
        self._roll_month(now)
        day = day_start(day_of)
        if day >= self._month:
            days = self._days.setdefault(key_id, {})
            days[day] = days.get(day, 0) + tokens

    def window_tokens(self, key_id: str) -> int:
        self._expire(key_id, self._clock())
        return self._window_sum.get(key_id, 0)

    def period_tokens(self, key_id: str, period: str) -> int:
        now = self._clock()
        self._roll_month(now)
        days = self._days.get(key_id, {})
        if period == "day":
            return days.get(day_start(now), 0)
        return sum(days.values())

    def wanted(self, key_id: str, settings: KeySettings | None) -> Wanted | None:
        """The refusal `key_id` should have now, or None (no limit reached, or no such key)."""
        if settings is None:
            self.forget(key_id)
            return None
        now = self._clock()
        budget, period = settings.budget_tokens, settings.budget_period
        if budget is not None and period is not None and self.period_tokens(key_id, period) >= budget:
            return Wanted(BUDGET_CODE, period_end(period, now))
        if settings.tpm_limit is not None:
            until = self._under_limit_at(key_id, settings.tpm_limit, now)
            if until is not None:
                return Wanted(TPM_CODE, until)
        return None

    def recent(self) -> Iterable[str]:
        """The keys with tokens in the window (or expired but not yet dropped from it)."""
        return tuple(self._window)

    def known(self) -> Iterable[str]:
        return set(self._window) | set(self._days)

    def forget(self, key_id: str) -> None:
        self._window.pop(key_id, None)
        self._window_sum.pop(key_id, None)

    def _under_limit_at(self, key_id: str, limit: int, now: float) -> float | None:
        """None when the window is under `limit`; else when enough of it will have expired to be."""
        self._expire(key_id, now)
        total = self._window_sum.get(key_id, 0)
        if total < limit:
            return None
        for second, tokens in self._window[key_id]:
            total -= tokens
            if total < limit:
                return float(second + WINDOW_S)  # this bucket leaves the window then
        raise AssertionError("unreachable: the whole window expired leaves 0 < limit")

    def _expire(self, key_id: str, now: float) -> None:
        window = self._window.get(key_id)
        if window is None:
            return
        oldest = math.floor(now) - WINDOW_S  # a bucket of second s counts until s + 60
        while window and window[0][0] <= oldest:
            self._window_sum[key_id] -= window.popleft()[1]
        if not window:
            self.forget(key_id)

    def _roll_month(self, now: float) -> None:
        month = month_start(now)
        if month != self._month:
            self._month = month
            self._days = {k: {d: t for d, t in days.items() if d >= month} for k, days in self._days.items()}
            self._days = {k: days for k, days in self._days.items() if days}


class DenialWorker:
    """Pushes the refusals `limits` wants, only when they change, from one task (bounded by the keys)."""

    def __init__(self, limits: TokenLimits, publisher: KeyPublisher, clock: Clock = time.time) -> None:
        self._limits = limits
        self._publisher = publisher
        self._clock = clock
        self._dirty: dict[str, None] = {}  # an ordered set of key ids to look at again
        self._task: asyncio.Task[None] | None = None
        self.pushes = 0  # refusals and lifts pushed (for tests and the log)

    def settings_of(self, key_id: str) -> KeySettings | None:
        key = self._publisher.by_id(key_id)
        return key.settings if key is not None else None

    def check(self, key_ids: Iterable[str]) -> None:
        """Look at these keys again soon (from the event loop; never waits)."""
        for key_id in key_ids:
            self._dirty[key_id] = None
        if self._dirty and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-denials")

    def needs_push(self, key_id: str) -> bool:
        wanted = self._limits.wanted(key_id, self.settings_of(key_id))
        current = self._publisher.denials().get(key_id)
        if wanted is None:
            return current is not None and current.until - self._clock() > LIFT_MARGIN_S
        return current != wanted.published_as()

    async def idle(self) -> None:
        """Wait until every change asked for is pushed (tests, shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while self._dirty:
            key_id = next(iter(self._dirty))
            del self._dirty[key_id]
            try:
                await self._apply(key_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed push: the next entry of this key tries again
                log.exception("pushing the refusal of key %s failed", key_id)

    async def _apply(self, key_id: str) -> None:
        if not self.needs_push(key_id):
            return
        wanted = self._limits.wanted(key_id, self.settings_of(key_id))
        self.pushes += 1
        if wanted is None:
            log.info("key %s: limit raised or removed, refusal lifted", key_id)
            await self._publisher.lift(key_id)
        else:
            await self._publisher.deny(key_id, wanted.code, wanted.until)
