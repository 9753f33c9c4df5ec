"""The counts behind the keys' live state (tenancy/live.py), from the access-log stream: each key's
requests in the last minute and its requests in flight, across every Envoy. Pure bookkeeping, event-loop
only, with an injectable clock.

In flight. Envoy logs a keyed request every LOG_INTERVAL_S while it lasts (the connection manager's
periodic access log) and once at its end. A request is in flight from its first periodic entry to its
end entry; every periodic entry renews it, so one not renewed for EXPIRE_S is dropped: an Envoy that
went away, or an end entry lost (Envoy drops entries rather than block when the stream lags), can never
leave a count stuck. A request shorter than LOG_INTERVAL_S is never in flight here: only long requests
(streams, long generations) hold concurrency long enough to matter.

A request is identified by its Envoy's log stream, its stream id (Envoy's request id, which a client
may choose: so its downstream address and start time too) and its key.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from control_plane.xds.builders.access_log import LIVE_LOG_INTERVAL_S

LOG_INTERVAL_S = LIVE_LOG_INTERVAL_S  # the periodic access log's interval
EXPIRE_S = 2.5  # a request not renewed this long (five intervals, flushes included) is gone
ENDED_MEMORY_S = 10.0  # an end entry is remembered this long, so that no late entry revives it
WINDOW_S = 60

Clock = Callable[[], float]
RequestId = tuple[str, str, str, float]  # (log stream, stream id, downstream address, start time)


@dataclass
class _Flight:
    key_id: str
    seen: float
    reserved: int = 0  # tokens held for it until it ends: its max_tokens (OpenAI counts them up front)


class InFlight:
    """Requests in flight per key."""

    def __init__(self, clock: Clock = time.monotonic, expire_s: float = EXPIRE_S) -> None:
        self._clock = clock
        self._expire_s = expire_s
        self._flights: dict[RequestId, _Flight] = {}
        self._per_key: dict[str, int] = {}
        self._ended: dict[RequestId, float] = {}  # insertion order = time order
        self._expired: dict[RequestId, float] = {}  # dropped unrenewed: in flight again if renewed late

    def seen(self, request: RequestId, key_id: str, reserved: int = 0) -> bool:
        """A periodic entry: the request is (still) in flight, holding `reserved` tokens of its key's
        per-minute limit until it ends. True when it is new here (not when its renewal only came late,
        after it expired: it was counted then)."""
        now = self._clock()
        if request in self._ended:
            return False
        flight = self._flights.get(request)
        if flight is not None:
            flight.seen = now
            return False
        self._flights[request] = _Flight(key_id, now, max(0, reserved))
        self._per_key[key_id] = self._per_key.get(key_id, 0) + 1
        return self._expired.pop(request, None) is None

    def ended(self, request: RequestId) -> bool:
        """The request's end entry. True when it was in flight (then it was counted when first seen)."""
        now = self._clock()
        self._ended[request] = now
        self._forget_ended(now)
        flight = self._flights.pop(request, None)
        if flight is None:
            return self._expired.pop(request, None) is not None  # counted before it expired
        self._drop(flight.key_id)
        return True

    def drop_stream(self, stream: str) -> None:
        """An Envoy's log stream ended: its requests are no longer known to be in flight."""
        for request in [r for r in self._flights if r[0] == stream]:
            self._drop(self._flights.pop(request).key_id)

    def expire(self) -> None:
        now = self._clock()
        for request in [r for r, f in self._flights.items() if now - f.seen > self._expire_s]:
            self._drop(self._flights.pop(request).key_id)
            self._expired[request] = now
        self._forget_ended(now)

    def count(self, key_id: str) -> int:
        return self._per_key.get(key_id, 0)

    def reserved(self) -> dict[str, int]:
        """Tokens held per key by its requests in flight (keys holding none are left out)."""
        out: dict[str, int] = {}
        for flight in self._flights.values():
            if flight.reserved:
                out[flight.key_id] = out.get(flight.key_id, 0) + flight.reserved
        return out

    def keys(self) -> set[str]:
        return set(self._per_key)

    def forget_key(self, key_id: str) -> None:
        """A key revoked: none of its requests counts any more (they end on their own)."""
        for request in [r for r, f in self._flights.items() if f.key_id == key_id]:
            del self._flights[request]
        self._per_key.pop(key_id, None)

    def _drop(self, key_id: str) -> None:
        left = self._per_key.get(key_id, 0) - 1
        if left > 0:
            self._per_key[key_id] = left
        else:
            self._per_key.pop(key_id, None)

    def _forget_ended(self, now: float) -> None:
        for memory in (self._ended, self._expired):
            while memory:
                request, at = next(iter(memory.items()))
                if now - at <= ENDED_MEMORY_S:
                    break
                del memory[request]


class RequestWindow:
    """Per key: the requests of the last WINDOW_S seconds, in whole-second buckets by arrival here."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._buckets: dict[str, deque[list[int]]] = {}
        self._sums: dict[str, int] = {}

    def add(self, key_id: str, count: int = 1) -> None:
        second = int(self._clock())
        buckets = self._buckets.setdefault(key_id, deque())
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += count
        else:
            buckets.append([second, count])
        self._sums[key_id] = self._sums.get(key_id, 0) + count

    def used(self, key_id: str) -> int:
        self._expire(key_id)
        return self._sums.get(key_id, 0)

    def keys(self) -> set[str]:
        for key_id in list(self._buckets):
            self._expire(key_id)
        return set(self._buckets)

    def forget(self, key_id: str) -> None:
        self._buckets.pop(key_id, None)
        self._sums.pop(key_id, None)

    def _expire(self, key_id: str) -> None:
        buckets = self._buckets.get(key_id)
        if buckets is None:
            return
        oldest = math.floor(self._clock()) - WINDOW_S
        while buckets and buckets[0][0] <= oldest:
            self._sums[key_id] -= buckets.popleft()[1]
        if not buckets:
            self.forget(key_id)


def refill_at(now: float, used: int, limit: int | None) -> int:
    """When `used` of a per-minute `limit` has refilled at the limit's rate (epoch s, rounded up): what
    OpenAI's `x-ratelimit-reset-*` tells. 0 when nothing is used or there is no limit."""
    if not limit or used <= 0:
        return 0
    return math.ceil(now + min(used, limit) * 60.0 / limit)
