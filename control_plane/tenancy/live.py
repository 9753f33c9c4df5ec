"""The keys' live state: what each active key used in the last minute across every Envoy, and which keys are
at their concurrency limit, published to every Envoy (builders/live.py) for OpenAI's
`x-ratelimit-remaining-*` / `-reset-*` headers and the `max_concurrent` refusal.

Fed by the access-log stream (an access-log sink that also takes the periodic entries, xds/als.py):
- requests: a keyed request counts once, when first seen (its first periodic entry, or its end entry
  for a request shorter than the log interval); refusals of the gateway's own limits and model checks do
  not count (they used no quota), answers of the engines do;
- tokens: the usage accounting's window (usage_limits.TokenLimits), counted at each answer's end, plus the
  `max_tokens` of the key's requests in flight, held for them until they end (OpenAI counts a request's
  max_tokens against the limit up front): a key whose window and held tokens reach its tokens per minute
  is refused (429 rate_limit_exceeded for tokens) until requests end or the window moves on, so long
  streams already running cannot carry it far past its limit;
- in flight: live_counts.InFlight.

`run()` looks every TICK_S: the table of the active keys (a key with a limit that used something in the
last minute or has requests in flight) is pushed when it changed, at most every PUSH_INTERVAL_S, or
sooner (BLOCK_PUSH_INTERVAL_S) when a key reaches or leaves its concurrency limit. So what a client
reads in the headers is an estimate a second or so old, and the concurrency limit is a soft one: it
refuses new requests once the control plane has seen the key's requests in flight, which takes the
periodic log's interval, the log's flush and one push (about 1 s); requests that arrive in that time are
let through (measured in tests/integration/test_live_limits.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.tenancy.keys import ApiKey
from control_plane.tenancy.live_counts import Clock, InFlight, RequestId, RequestWindow, refill_at
from control_plane.tenancy.publish import KeyPublisher
from control_plane.tenancy.usage_limits import TokenLimits
from control_plane.xds.builders.live import LiveEntry
from control_plane.xds.builders.usage import MAX_TOKENS_KEY
from control_plane.xds.log_entries import metadata_fields, number_field, string_field
from control_plane.xds.resources import METADATA_NAMESPACE

log = logging.getLogger(__name__)

TICK_S = 0.25
PUSH_INTERVAL_S = 1.0
BLOCK_PUSH_INTERVAL_S = 0.25
# Answers that used no request quota: the key check's, the quota filter's and this filter's refusals.
NOT_COUNTED = frozenset({"model_not_allowed", "rate_limit_exceeded", "insufficient_quota"})
_PERIODIC = accesslog_pb2.AccessLogType.DownstreamPeriodic

Publish = Callable[[tuple[LiveEntry, ...]], Awaitable[None]]


class LiveState:
    """An access-log sink (`record_live`) and the publisher of the live table. Event-loop only."""

    def __init__(
        self,
        publisher: KeyPublisher,
        tokens: TokenLimits,
        publish: Publish,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self._keys = publisher
        self._tokens = tokens
        self._publish = publish
        self._clock = clock
        self._monotonic = monotonic
        self.in_flight = InFlight(clock=monotonic)
        self.requests = RequestWindow(clock=clock)
        self._published: tuple[LiveEntry, ...] | None = None
        self._last_push = -1e9
        self._task: asyncio.Task[None] | None = None
        self.pushes = 0

    # The access-log sink (xds/als.py LiveSink)
    def record_live(self, entry: accesslog_pb2.HTTPAccessLogEntry, stream: str) -> None:
        gateway = metadata_fields(entry, METADATA_NAMESPACE)
        key = gateway.get("key")
        if key is None or key.WhichOneof("kind") != "struct_value":
            return
        key_id = string_field(dict(key.struct_value.fields), "key_id")
        if key_id is None:
            return
        common = entry.common_properties
        address = common.downstream_remote_address.socket_address
        start = common.start_time
        request: RequestId = (
            stream,
            common.stream_id or entry.request.request_id,
            f"{address.address}:{address.port_value}",
            start.seconds + start.nanos / 1e9,
        )
        if common.access_log_type == _PERIODIC:
            max_tokens = number_field(gateway, MAX_TOKENS_KEY)
            if self.in_flight.seen(request, key_id, int(max_tokens) if max_tokens else 0):
                self.requests.add(key_id)
            return
        if self.in_flight.ended(request):
            return  # counted when first seen
        code = entry.response.response_headers.get("x-gateway-error-code", "")
        if code not in NOT_COUNTED:
            self.requests.add(key_id)

    def stream_ended(self, stream: str) -> None:
        """An Envoy's access-log stream closed: its requests in flight are dropped."""
        self.in_flight.drop_stream(stream)

    # Keys
    async def keys_changed(self, table: tuple[ApiKey, ...]) -> None:
        """A KeyService listener: a revoked key's live state goes at once (not even its counts stay)."""
        active = {k.id for k in table}
        for key_id in (self.in_flight.keys() | self.requests.keys()) - active:
            self.in_flight.forget_key(key_id)
            self.requests.forget(key_id)

    # The table
    def table(self) -> tuple[LiveEntry, ...]:
        self.in_flight.expire()
        now = self._clock()
        rows = []
        candidates = self.in_flight.keys() | self.requests.keys() | set(self._tokens.recent())
        held = self.in_flight.reserved()
        for key_id in sorted(candidates):
            key = self._keys.by_id(key_id)
            if key is None:
                continue
            settings = key.settings
            if settings.rpm_limit is None and settings.tpm_limit is None and settings.max_concurrent is None:
                continue
            used_rq = self.requests.used(key_id)
            used_tk = self._tokens.window_tokens(key_id) + held.get(key_id, 0)
            flying = self.in_flight.count(key_id)
            if not (used_rq or used_tk or flying):
                continue
            limit, tpm = settings.max_concurrent, settings.tpm_limit
            rows.append(
                LiveEntry(
                    key_id=key_id,
                    requests=used_rq,
                    requests_reset_at=refill_at(now, used_rq, settings.rpm_limit),
                    tokens=used_tk,
                    tokens_reset_at=refill_at(now, used_tk, settings.tpm_limit),
                    in_flight=flying,
                    blocked_at=limit if limit is not None and flying >= limit else 0,
                    tokens_blocked_at=tpm if tpm is not None and held.get(key_id) and used_tk >= tpm else 0,
                )
            )
        return tuple(rows)

    async def tick(self) -> bool:
        """Push the table if it changed and its interval has passed; True when pushed."""
        rows = self.table()
        if rows == self._published:
            return False
        elapsed = self._monotonic() - self._last_push
        blocked = {r.key_id for r in rows if r.blocked_at or r.tokens_blocked_at}
        was_blocked = {r.key_id for r in self._published or () if r.blocked_at or r.tokens_blocked_at}
        wait = BLOCK_PUSH_INTERVAL_S if blocked != was_blocked else PUSH_INTERVAL_S
        if self._published is not None and elapsed < wait:
            return False
        self._last_push = self._monotonic()
        await self._publish(rows)
        self._published = rows
        self.pushes += 1
        if blocked != was_blocked:
            names = ", ".join(sorted(blocked)) or "none"
            log.info("keys at their concurrency or held-token limit: %s", names)
        return True

    def blocked(self) -> set[str]:
        return {r.key_id for r in self._published or () if r.blocked_at or r.tokens_blocked_at}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="key-live-state")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad row or a failed push: the next tick tries again
                log.exception("publishing the keys' live state failed")
            await asyncio.sleep(TICK_S)
