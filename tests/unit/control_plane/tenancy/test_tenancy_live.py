"""The keys' live state with injected clocks: requests counted once (first periodic entry or end), the
gateway's own refusals not counted, requests in flight that can never stay stuck (end, expiry, a lost log
stream, a revoked key), the table of active keys only, pushes only on a change and paced, and the Lua
data the filter reads."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.envoy_bootstrap import envoy_binary
from control_plane.tenancy.live import LiveState
from control_plane.tenancy.live_counts import EXPIRE_S, InFlight, RequestWindow, refill_at
from control_plane.xds.builders.keys import _code as key_code
from control_plane.xds.builders.live import LiveEntry, live_source
from tests.support.usage_entries import KEY_A, KEY_B, Clock, Harness, api_key, keyed_entry

pytestmark = pytest.mark.unit

T0 = 1_900_000_000.0
KEY_SOURCE = "local KEY_DATA = ''\n" + key_code()


def entry(
    stream_id: str,
    key_id: str = KEY_A,
    periodic: bool = False,
    code: str | None = None,
    port: int = 5000,
    max_tokens: int | None = None,
) -> accesslog_pb2.HTTPAccessLogEntry:
    out = keyed_entry(
        key_id, "team", "qwen2", status=429 if code else 200, code=code, start=T0, max_tokens=max_tokens
    )
    out.common_properties.stream_id = stream_id
    out.common_properties.downstream_remote_address.socket_address.address = "127.0.0.1"
    out.common_properties.downstream_remote_address.socket_address.port_value = port
    if periodic:
        out.common_properties.access_log_type = accesslog_pb2.AccessLogType.DownstreamPeriodic
    else:
        out.common_properties.access_log_type = accesslog_pb2.AccessLogType.DownstreamEnd
    return out


class Live:
    def __init__(self) -> None:
        self.wall = Clock(T0)
        self.mono = Clock(100.0)
        self.harness = Harness(":memory:", self.wall)
        self.pushed: list[tuple[LiveEntry, ...]] = []

        async def publish(rows: tuple[LiveEntry, ...]) -> None:
            self.pushed.append(rows)

        self.live = LiveState(
            self.harness.publisher, self.harness.usage.limits, publish, clock=self.wall, monotonic=self.mono
        )

    async def keys(self, *keys: object) -> None:
        await self.harness.publisher.keys_changed(keys)  # type: ignore[arg-type]
        await self.live.keys_changed(keys)  # type: ignore[arg-type]

    def row(self, key_id: str = KEY_A) -> LiveEntry | None:
        return next((r for r in self.live.table() if r.key_id == key_id), None)


def test_requests_count_once_and_refusals_not_at_all() -> None:
    async def scenario() -> None:
        t = Live()
        await t.keys(api_key(KEY_A, "team", rpm_limit=60), api_key(KEY_B, "free"))
        t.live.record_live(entry("r1"), "s1")  # a short request: counted at its end
        t.live.record_live(entry("r2", periodic=True), "s1")  # a long one: at its first periodic entry
        t.live.record_live(entry("r2", periodic=True), "s1")
        t.live.record_live(entry("r2"), "s1")  # ... and not again at its end
        for code in ("rate_limit_exceeded", "model_not_allowed", "insufficient_quota"):
            t.live.record_live(entry(f"refused-{code}", code=code), "s1")
        t.live.record_live(entry("b1", key_id=KEY_B), "s1")
        row = t.row()
        assert row is not None and row.requests == 2 and row.in_flight == 0
        assert row.requests_reset_at == refill_at(T0, 2, 60) == int(T0) + 2  # 2 of 60/min refill in 2 s
        assert t.row(KEY_B) is None  # a key without limits is not in the table

    asyncio.run(scenario())


def test_in_flight_requests_are_never_stuck() -> None:
    mono = Clock(0.0)
    flights = InFlight(clock=mono)
    a = ("s1", "r1", "127.0.0.1:1", T0)
    b = ("s1", "r2", "127.0.0.1:2", T0)
    c = ("s2", "r3", "127.0.0.1:3", T0)
    assert flights.seen(a, KEY_A) and not flights.seen(a, KEY_A)
    assert flights.seen(b, KEY_A) and flights.seen(c, KEY_A)
    assert flights.count(KEY_A) == 3
    assert flights.ended(a) and flights.count(KEY_A) == 2
    assert not flights.seen(a, KEY_A)  # a late periodic entry does not revive an ended request
    flights.drop_stream("s2")  # that Envoy's log stream went away
    assert flights.count(KEY_A) == 1
    mono.now = EXPIRE_S + 0.1  # b's end entry was lost: no renewal, so it expires
    flights.expire()
    assert flights.count(KEY_A) == 0 and flights.keys() == set()
    # Renewed late (a lagging log stream): in flight again, but not a new request; its end counts once.
    assert not flights.seen(b, KEY_A) and flights.count(KEY_A) == 1
    mono.now += EXPIRE_S + 0.1
    flights.expire()
    assert flights.ended(b) and flights.count(KEY_A) == 0
    # The same request id from another connection (a client may choose it) is another request.
    assert flights.seen(("s1", "same", "127.0.0.1:1", T0), KEY_A)
    assert flights.seen(("s1", "same", "127.0.0.1:2", T0), KEY_A)
    assert flights.count(KEY_A) == 2


def test_the_concurrency_limit_blocks_and_lifts_with_paced_pushes() -> None:
    async def scenario() -> None:
        t = Live()
        await t.keys(api_key(KEY_A, "team", max_concurrent=2))
        assert await t.live.tick() and t.pushed[-1] == ()  # the first table at once (empty)
        t.live.record_live(entry("r1", periodic=True), "s1")
        t.mono.now += 0.3
        assert not await t.live.tick()  # a count change only: not before the full interval
        t.mono.now += 1.0
        assert await t.live.tick()
        assert t.pushed[-1][0].in_flight == 1 and not t.pushed[-1][0].blocked_at
        t.live.record_live(entry("r2", periodic=True), "s1")
        t.mono.now += 0.3  # the limit reached: pushed after the short interval, not the second
        assert await t.live.tick()
        assert t.pushed[-1][0].blocked_at == 2 and t.live.blocked() == {KEY_A}
        t.live.record_live(entry("r1"), "s1")
        t.mono.now += 0.3
        assert await t.live.tick() and t.live.blocked() == set()
        pushes = len(t.pushed)
        t.live.record_live(entry("r3"), "s1")  # a count change only: waits for the full interval
        t.mono.now += 0.3
        assert not await t.live.tick() and len(t.pushed) == pushes
        t.mono.now += 1.0
        assert await t.live.tick() and not await t.live.tick()  # pushed once, then nothing changed

    asyncio.run(scenario())


def test_requests_in_flight_hold_their_max_tokens_against_the_tokens_per_minute() -> None:
    """OpenAI counts max_tokens against the limit up front: while a key's requests in flight hold enough
    of them to reach its tokens per minute, new requests are refused; they are released at each end."""

    async def scenario() -> None:
        t = Live()
        await t.keys(api_key(KEY_A, "team", tpm_limit=1000))
        t.live.record_live(entry("r1", periodic=True, max_tokens=600), "s1")
        t.live.record_live(entry("r1", periodic=True, max_tokens=600), "s1")  # a renewal: held once
        row = t.row()
        assert row is not None and row.tokens == 600 and not row.tokens_blocked_at
        t.live.record_live(entry("r2", periodic=True, max_tokens=500, port=5001), "s1")
        row = t.row()
        assert row is not None and row.tokens == 1100 and row.tokens_blocked_at == 1000
        assert await t.live.tick() and t.live.blocked() == {KEY_A}
        assert "tokens_blocked" in live_source(t.pushed[-1])
        t.live.record_live(entry("r2", max_tokens=500, port=5001), "s1")  # ends: its tokens released
        row = t.row()
        assert row is not None and row.tokens == 600 and not row.tokens_blocked_at
        t.mono.now += 0.3
        assert await t.live.tick() and t.live.blocked() == set()
        t.live.record_live(entry("r3", periodic=True, port=5002), "s1")  # no max_tokens: holds nothing
        row = t.row()
        assert row is not None and row.tokens == 600

    asyncio.run(scenario())


def test_a_revoked_key_leaves_no_live_state() -> None:
    async def scenario() -> None:
        t = Live()
        await t.keys(api_key(KEY_A, "team", rpm_limit=100, max_concurrent=3))
        t.live.record_live(entry("r1", periodic=True), "s1")
        t.live.record_live(entry("r2"), "s1")
        assert t.row() is not None
        await t.keys()
        assert t.row() is None
        assert t.live.in_flight.keys() == set() and t.live.requests.keys() == set()

    asyncio.run(scenario())


def test_the_request_window_slides_over_a_minute() -> None:
    clock = Clock(T0)
    window = RequestWindow(clock=clock)
    window.add(KEY_A)
    clock.now = T0 + 30
    window.add(KEY_A, 2)
    assert window.used(KEY_A) == 3
    clock.now = T0 + 60
    assert window.used(KEY_A) == 2
    clock.now = T0 + 91
    assert window.used(KEY_A) == 0 and window.keys() == set()
    assert refill_at(T0, 0, 100) == 0 and refill_at(T0, 5, None) == 0
    assert refill_at(T0, 500, 100) == int(T0) + 60  # never more than the whole minute


def test_the_lua_data_and_the_refusal_code_only_while_a_key_is_at_its_limit() -> None:
    rows = (LiveEntry(KEY_A, 3, int(T0) + 2, 40, int(T0) + 5, 1), LiveEntry(KEY_B, in_flight=2, blocked_at=2))
    source = live_source(rows)
    assert f"{KEY_A}\t3\t{int(T0) + 2}\t40\t{int(T0) + 5}\t1\t0\t0\n" in source
    assert "function envoy_on_request" in source and "concurrency_limit" in source
    assert "function envoy_on_request" not in live_source(rows[:1])
    with pytest.raises(ValueError):
        LiveEntry("bad\tid").line()


def test_the_access_log_stream_gives_periodic_entries_only_to_the_live_state() -> None:
    """The usage accounting (and every other sink) counts a request once, at its end; the live state sees
    the periodic entries too, and drops the stream's requests in flight when the stream ends."""
    from envoy.service.accesslog.v3 import als_pb2

    from control_plane.xds.als import AccessLogServicer

    class Context:
        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

    async def scenario() -> None:
        t = Live()
        await t.keys(api_key(KEY_A, "team", rpm_limit=100, max_concurrent=3))
        ended: list[object] = []

        class EndSink:
            def record(self, e: accesslog_pb2.HTTPAccessLogEntry) -> None:
                ended.append(e)

        servicer = AccessLogServicer([EndSink(), t.live])
        message = als_pb2.StreamAccessLogsMessage()
        message.http_logs.log_entry.extend(
            [entry("r1", periodic=True), entry("r2", periodic=True), entry("r2")]
        )
        seen_in_flight: list[int] = []

        async def messages():  # type: ignore[no-untyped-def]
            yield message
            seen_in_flight.append(t.live.in_flight.count(KEY_A))

        await servicer.StreamAccessLogs(messages(), Context())  # type: ignore[arg-type]
        assert len(ended) == 1  # the end entry only
        assert seen_in_flight == [1]  # r1 in flight while the stream lasted ...
        assert t.live.in_flight.count(KEY_A) == 0  # ... dropped with it
        assert t.live.requests.used(KEY_A) == 2

    asyncio.run(scenario())


def test_envoy_loads_the_live_code_with_and_without_the_refusal(tmp_path: Path) -> None:
    """Envoy's validate mode compiles a Lua filter's code: both shapes of the live filter load, next to
    the key check (which no longer has a response hook)."""
    rows = (
        LiveEntry(KEY_A, 3, int(T0) + 2, 40, int(T0) + 5, 1),
        LiveEntry(KEY_B, in_flight=2, blocked_at=2),
        LiveEntry("key_c", tokens=900, in_flight=1, tokens_blocked_at=800),
    )
    lua = {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"}
    router = {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    for name, entries in (("plain", rows[:1]), ("blocking", rows)):
        filters = [
            {"name": "keys", "typed_config": {**lua, "default_source_code": {"inline_string": KEY_SOURCE}}},
            {
                "name": "live",
                "typed_config": {**lua, "default_source_code": {"inline_string": live_source(entries)}},
            },
            {"name": "envoy.filters.http.router", "typed_config": router},
        ]
        manager = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager",
            "stat_prefix": "t",
            "route_config": {},
            "http_filters": filters,
        }
        listener = {
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [{"name": "hcm", "typed_config": manager}]}],
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"static_resources": {"listeners": [listener]}}))
        done = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
