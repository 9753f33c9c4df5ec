"""Token limits from the usage accounting, with an injected clock: a key over its tokens per minute is
refused until enough of the window has expired, the refusal lifts by itself (no push), a limit raised
lifts it at once, budgets refuse until the UTC day or month ends, and pushes happen only on a change,
one at a time, never holding up the access-log consumer; after a restart the window is seeded from the
stored minutes, so a key that used its tokens just before it is still refused."""

from __future__ import annotations

import asyncio
import calendar
from pathlib import Path

import pytest

from control_plane.tenancy.keys import ApiKey
from control_plane.tenancy.usage_limits import period_end
from tests.support.usage_entries import KEY_A, KEY_B, Clock, Harness, api_key, keyed_entry

pytestmark = pytest.mark.unit

T0 = float(calendar.timegm((2030, 6, 15, 12, 0, 0)))


async def set_keys(h: Harness, *keys: ApiKey) -> None:
    await h.publisher.keys_changed(keys)
    await h.usage.keys_changed(keys)  # the usage listener runs after the publisher's
    await h.usage.denials.idle()


def use(h: Harness, tokens: int, key_id: str = KEY_A, name: str = "team-a") -> None:
    h.usage.record(
        keyed_entry(
            key_id, name, "qwen", prompt=tokens // 2, completion=tokens - tokens // 2, start=h.clock.now
        )
    )


def denied(h: Harness, key_id: str = KEY_A) -> tuple[str, int] | None:
    entry = next(e for e in h.tables[-1] if e.id == key_id)
    return (entry.denied, entry.denied_until) if entry.denied else None


def test_tokens_per_minute_refused_until_the_window_is_under_the_limit(tmp_path: object) -> None:
    async def scenario() -> None:
        clock = Clock(T0)
        h = Harness(":memory:", clock)
        await set_keys(h, api_key(KEY_A, "team-a", tpm_limit=100), api_key(KEY_B, "team-b"))
        pushed = len(h.tables)
        use(h, 40)
        clock.now = T0 + 10
        use(h, 50)
        await h.usage.denials.idle()
        assert len(h.tables) == pushed and h.usage.limits.window_tokens(KEY_A) == 90  # under: no push

        clock.now = T0 + 20
        use(h, 30)  # 120 in the last minute: refused until the first 40 leave the window (T0 + 60)
        await h.usage.denials.idle()
        assert denied(h) == ("rate_limit_exceeded", int(T0) + 61)  # whole seconds, rounded up
        assert denied(h, KEY_B) is None and len(h.tables) == pushed + 1

        # Streams in flight when the refusal went out end and add tokens: the refusal is extended only
        # when its end moves (to T0 + 70, when the 50 of T0 + 10 leave too), once.
        clock.now = T0 + 21
        for _ in range(5):
            use(h, 10)
        await h.usage.denials.idle()
        assert denied(h) == ("rate_limit_exceeded", int(T0) + 71) and len(h.tables) == pushed + 2
        # Records for the same key while refused change nothing: no push.
        use(h, 2)
        await h.usage.denials.idle()
        assert len(h.tables) == pushed + 2

        # The refusal ends by itself in Envoy (its time passes); nothing is pushed for that ...
        clock.now = T0 + 71.5
        h.usage.denials.check([KEY_A])
        await h.usage.denials.idle()
        assert len(h.tables) == pushed + 2 and h.publisher.denials() == {}
        assert h.usage.limits.window_tokens(KEY_A) == 82  # the 30 of T0 + 20 and 52 of T0 + 21
        # ... and the next push (any key change) carries no refusal.
        await set_keys(h, api_key(KEY_A, "team-a", tpm_limit=100), api_key(KEY_B, "team-b", rpm_limit=5))
        assert denied(h) is None

        # Over again: refused until the 30 of T0 + 20 leave (T0 + 80); a raised limit lifts it at once.
        clock.now = T0 + 72
        use(h, 30)
        await h.usage.denials.idle()
        assert denied(h) == ("rate_limit_exceeded", int(T0) + 81)
        await set_keys(h, api_key(KEY_A, "team-a", tpm_limit=1000), api_key(KEY_B, "team-b", rpm_limit=5))
        assert denied(h) is None and h.publisher.denials() == {}
        # A limit lowered below what the last minute used refuses at once: until the 52 of T0 + 21 leave.
        await set_keys(h, api_key(KEY_A, "team-a", tpm_limit=50), api_key(KEY_B, "team-b", rpm_limit=5))
        assert denied(h) == ("rate_limit_exceeded", int(T0) + 82)
        # A revoked key (gone from the table) is forgotten.
        await set_keys(h, api_key(KEY_B, "team-b", rpm_limit=5))
        assert h.usage.limits.window_tokens(KEY_A) == 0

    asyncio.run(scenario())


def test_budgets_refuse_until_the_period_ends_and_win_over_tokens_per_minute() -> None:
    async def scenario() -> None:
        clock = Clock(float(calendar.timegm((2030, 12, 31, 23, 58, 0))))
        h = Harness(":memory:", clock)
        month = api_key(KEY_A, "team-a", budget_tokens=1000, budget_period="month", tpm_limit=500)
        daily = api_key(KEY_B, "team-b", budget_tokens=100, budget_period="day")
        await set_keys(h, month, daily)
        use(h, 400)
        clock.now += 61
        use(h, 400)  # 800 this month, 400 in the last minute: under both
        await h.usage.denials.idle()
        assert denied(h) is None
        use(h, 200)  # 1000: the budget (to the month's end), though the minute is over its limit too
        await h.usage.denials.idle()
        new_year = calendar.timegm((2031, 1, 1, 0, 0, 0))
        assert denied(h) == ("insufficient_quota", new_year + 1)

        use(h, 99, KEY_B, "team-b")
        await h.usage.denials.idle()
        assert denied(h, KEY_B) is None
        use(h, 1, KEY_B, "team-b")
        await h.usage.denials.idle()
        assert denied(h, KEY_B) == ("insufficient_quota", new_year + 1)

        # A new month and day: nothing used yet, nothing refused; the budget grown lifts at once too.
        clock.now = new_year + 5
        assert h.usage.limits.period_tokens(KEY_A, "month") == 0
        assert h.usage.limits.period_tokens(KEY_B, "day") == 0
        use(h, 10)
        await h.usage.denials.idle()
        assert h.publisher.denials() == {}

    asyncio.run(scenario())


def test_a_grown_budget_lifts_the_refusal() -> None:
    async def scenario() -> None:
        clock = Clock(T0)
        h = Harness(":memory:", clock)
        await set_keys(h, api_key(KEY_A, "team-a", budget_tokens=100, budget_period="day"))
        use(h, 150)
        await h.usage.denials.idle()
        assert denied(h) == ("insufficient_quota", period_end("day", T0) + 1)
        await set_keys(h, api_key(KEY_A, "team-a", budget_tokens=1000, budget_period="day"))
        assert denied(h) is None

    asyncio.run(scenario())


def test_a_slow_push_never_holds_up_the_entries_and_pushes_stay_bounded() -> None:
    async def scenario() -> None:
        clock = Clock(T0)
        h = Harness(":memory:", clock)
        keys = tuple(api_key(f"key_{i:016x}", f"team-{i}", tpm_limit=10) for i in range(20))
        await set_keys(h, *keys)
        release = asyncio.Event()
        calls = 0
        fast_push = h.publisher._push

        async def slow_push(entries: object) -> None:
            nonlocal calls
            calls += 1
            await release.wait()
            await fast_push(entries)  # type: ignore[arg-type]

        h.publisher._push = slow_push  # type: ignore[method-assign]
        # 20 keys over their limit, 50 entries each, while the first push hangs: every record returns.
        for _ in range(50):
            for key in keys:
                use(h, 20, key.id, key.name)
                clock.now += 0.001
        await asyncio.sleep(0.05)
        assert calls == 1  # one push in flight, the rest waiting in the worker's set
        release.set()
        await h.usage.denials.idle()
        assert set(h.publisher.denials()) == {k.id for k in keys}
        assert calls <= 2 * len(keys)  # a refusal and at most one extension per key, not one per entry
        assert sum(1 for e in h.tables[-1] if e.denied == "rate_limit_exceeded") == len(keys)

    asyncio.run(scenario())



async def restarted(db: Path, clock: Clock, key: ApiKey, used: float, restart: float, tokens: int) -> Harness:
    """`tokens` used by `key` at `used`, stored at shutdown; then a new accounting over the same SQLite
    file at `restart`, with the keys loaded as at start (TenancyWiring.start)."""
    clock.now = used
    before = Harness(db, clock)
    await set_keys(before, key)
    use(before, tokens, key.id, key.name)
    await before.usage.denials.idle()
    before.usage.stop()  # shutdown: the pending minute rows are stored
    before.store.close()
    clock.now = restart
    after = Harness(db, clock)
    await set_keys(after, key)
    return after


def test_tokens_per_minute_used_just_before_a_restart_are_still_refused_after_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        db, clock = tmp_path / "gateway.db", Clock(T0)
        key = api_key(KEY_A, "team-a", tpm_limit=100)
        # Used at 12:00:50, restarted 15 s later (the next minute): the previous minute's row is read and
        # its tokens count as used at the restart, so the refusal lasts a full minute from it.
        restart = T0 + 65
        h = await restarted(db, clock, key, T0 + 50, restart, 120)
        assert h.usage.limits.window_tokens(KEY_A) == 120
        assert denied(h) == ("rate_limit_exceeded", int(restart) + 61)
        # It ends by itself; then 60 used and a restart in the same minute: seeded, under the limit ...
        clock.now = restart + 61
        assert h.usage.limits.window_tokens(KEY_A) == 0
        h.usage.stop()
        h.store.close()
        again = await restarted(db, clock, key, restart + 61, restart + 70, 60)
        assert again.usage.limits.window_tokens(KEY_A) == 60 and denied(again) is None
        # ... and the seeded tokens add to those used after it: 60 + 50 is over 100.
        use(again, 50)
        await again.usage.denials.idle()
        assert denied(again) == ("rate_limit_exceeded", int(restart) + 70 + 61)
        again.store.close()

    asyncio.run(scenario())


def test_tokens_per_minute_used_two_minutes_before_a_restart_are_not_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = Clock(T0)
        key = api_key(KEY_A, "team-a", tpm_limit=100)
        h = await restarted(tmp_path / "gateway.db", clock, key, T0 + 50, T0 + 170, 500)
        assert h.usage.limits.window_tokens(KEY_A) == 0
        assert denied(h) is None and h.publisher.denials() == {}
        # The minute row is still there for the usage API; only the window leaves it out.
        assert h.usage.summary(KEY_A, int(T0), int(T0) + 60, "model")["qwen2"].tokens == 500
        h.store.close()

    asyncio.run(scenario())
