"""Per-key requests-per-minute limits that hold across every Envoy: the control plane as the quota server
(RLQS, `envoy.service.rate_limit_quota.v3`) of Envoy's `rate_limit_quota` filter (builders/quota.py).

Each Envoy keeps one stream open and puts every request of a key in that key's bucket (BucketId
`{key: <key id>}`); it reports each bucket's allowed and denied requests when the bucket appears and then
every 5 s, and enforces whatever this server answers, with no call on the request path. So, per key and
per stream (= per Envoy), the server keeps the recent demand (allowed + denied requests per minute, timed
here: Envoy truncates its own `time_elapsed` to whole seconds) and shares the key's `rpm_limit` L between
the Envoys that serve it (`QuotaSplit`, max-min fair by demand by default: quota_split.py); each share
becomes a whole-second token bucket. The shares add up to at most L, so the key gets at most about L per
minute in total however its clients spread over the Envoys.

When the shares move:
- a bucket's first report (a key new to that Envoy) is answered at once, and the other Envoys serving the
  key get their smaller shares in the same step;
- every report is answered (it refreshes the assignments' time to live, ASSIGNMENT_TTL_S); a share that
  moved only a little keeps its running bucket (Envoy restarts a changed bucket full, so needless changes
  would let bursts through);
- a stream that ends hands its shares to the remaining Envoys;
- `limits_changed()` (after a key is created, changed or revoked) re-assigns every bucket at once.
A key without a limit gets ALLOW_ALL (still reported, so usage stays visible); a key id that `limit_of`
does not know (revoked, expired, never existed) gets DENY_ALL, behind the key check that already refuses
it. A bucket idle for IDLE_ABANDON_S is abandoned: Envoy forgets it, and a new request starts it again.

Costs and limits of the protocol (Envoy 1.40): until a new bucket's first answer arrives (a round trip to
the control plane) its requests are allowed; an Envoy that loses the stream keeps its last share until the
time to live runs out, then allows everything (the filter's fallback) until it reconnects, at most 5 s later.

The stream is authenticated like the access-log stream (xds/auth.py): the deployment-wide credential in
the `authorization` metadata. All state lives on the gRPC server's event loop: call `limits_changed` and
`snapshot` from it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.type.v3 import ratelimit_strategy_pb2

from control_plane.tenancy.quota_split import (
    MaxMinSplit,
    QuotaSplit,
    WholeSecondBucket,
    distinct_from,
    token_bucket_for,
)
from control_plane.xds.auth import XdsAuthenticator
from control_plane.xds.builders.quota import BUCKET_KEY

log = logging.getLogger(__name__)

# Envoy reports every 5 s: a lost stream is noticed well within this, a restarted control plane too.
ASSIGNMENT_TTL_S = 30
IDLE_ABANDON_S = 120.0
# Demand is measured over the last few reports (about 15 s), never over less than a second.
DEMAND_REPORTS = 3
MIN_DEMAND_SPAN_S = 1.0
# A running bucket is kept while its rate stays within these bounds of the new share.
KEEP_BELOW = 0.10  # a share up to 10 % above the bucket's rate leaves it as it is ...
KEEP_ABOVE = 0.03  # ... and so does one up to 3 % below it (the total may exceed L by that much)
MAX_KEY_ID_LENGTH = 128

Action = Literal["token_bucket", "allow_all", "deny_all"]
LimitOf = Callable[[str], int | None]
_Response: TypeAlias = rlqs_pb2.RateLimitQuotaResponse
_BucketAction: TypeAlias = rlqs_pb2.RateLimitQuotaResponse.BucketAction
_Strategy = ratelimit_strategy_pb2.RateLimitStrategy


class UnknownKey(LookupError):
    """What `limit_of` raises for a key id that must not be served (unknown, revoked, expired)."""


@dataclass(frozen=True)
class Assignment:
    action: Action
    bucket: WholeSecondBucket | None = None

    @property
    def per_minute(self) -> float | None:
        """The assigned rate: None when unlimited, 0 when denied."""
        if self.action == "allow_all":
            return None
        return self.bucket.per_minute if self.bucket else 0.0


ALLOW_ALL = Assignment("allow_all")
DENY_ALL = Assignment("deny_all")


@dataclass
class _Bucket:
    """One key on one stream."""

    bucket_id: rlqs_pb2.BucketId
    last_busy: float
    reports: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=DEMAND_REPORTS + 1))
    sent: Assignment | None = None
    share: float | None = None  # requests per minute, when limited

    def record(self, now: float, requests: int) -> None:
        self.reports.append((now, requests))
        if requests:
            self.last_busy = now

    def demand(self) -> float | None:
        """Requests per minute (allowed and denied) since the oldest report kept; None: not measured yet.
        The oldest report only marks the start: what it counts happened before it."""
        if len(self.reports) < 2:
            return None
        span = self.reports[-1][0] - self.reports[0][0]
        if span < MIN_DEMAND_SPAN_S:
            return None
        return 60.0 * sum(n for _, n in itertools.islice(self.reports, 1, None)) / span


@dataclass
class _Stream:
    """One Envoy."""

    sid: int
    peer: str
    outbox: asyncio.Queue[_Response | None] = field(default_factory=asyncio.Queue)
    buckets: dict[str, _Bucket] = field(default_factory=dict)


@dataclass(frozen=True)
class BucketFigures:
    """One key on one Envoy, for tests, metrics and the status page."""

    key_id: str
    stream: int
    peer: str
    limit: int | None
    demand_per_minute: float | None
    share_per_minute: float | None
    assigned_per_minute: float | None  # None: unlimited
    action: Action | None  # None: nothing sent yet


class QuotaServicer(rlqs_pb2_grpc.RateLimitQuotaServiceServicer):
    def __init__(
        self,
        limit_of: LimitOf,
        *,
        authenticator: XdsAuthenticator | None = None,
        split: QuotaSplit | None = None,
        clock: Callable[[], float] = time.monotonic,
        ttl_s: int = ASSIGNMENT_TTL_S,
        idle_s: float = IDLE_ABANDON_S,
    ) -> None:
        self._limit_of = limit_of
        self._auth = authenticator
        self._split: QuotaSplit = split or MaxMinSplit()
        self._clock = clock
        self._ttl_s = max(1, int(ttl_s))  # Envoy reads whole seconds; 0 would expire at once
        self._idle_s = idle_s
        self._streams: dict[int, _Stream] = {}
        self._policies: dict[str, Assignment | int] = {}  # per key: the limit last applied
        self._next_sid = itertools.count(1)

    async def StreamRateLimitQuotas(
        self,
        request_iterator: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[_Response]:
        reports = request_iterator
        if self._auth is not None:
            # RLQS reports name no node; the credential is the deployment-wide one (not node-bound), so
            # the id only names the log line.
            reports = await self._auth.admit(
                "rlqs", reports, context, node_bound=False, node_of=lambda r: f"rlqs:{r.domain or '-'}"[:80]
            )
        stream = _Stream(sid=next(self._next_sid), peer=context.peer())
        self._streams[stream.sid] = stream
        reader = asyncio.create_task(self._read(stream, reports))
        try:
            while (response := await stream.outbox.get()) is not None:
                yield response
        finally:
            reader.cancel()
            self._close(stream)

    async def _read(
        self, stream: _Stream, reports: AsyncIterator[rlqs_pb2.RateLimitQuotaUsageReports]
    ) -> None:
        try:
            async for report in reports:
                self._on_report(stream, report)
        except grpc.aio.AioRpcError:
            pass  # the Envoy went away: the stream ends below
        except Exception:  # a bug here must end this stream, not leave it without answers
            log.exception("RLQS stream from %s failed", stream.peer)
        finally:
            stream.outbox.put_nowait(None)

    # Re-splitting
    def limits_changed(self) -> None:
        """Re-assign every bucket of every Envoy now (a key was created, changed or revoked)."""
        keys = {key for stream in self._streams.values() for key in stream.buckets}
        self._send(self._resplit(keys, force=True))

    def _on_report(self, stream: _Stream, report: rlqs_pb2.RateLimitQuotaUsageReports) -> None:
        now = self._clock()
        reported: list[str] = []
        out: dict[int, list[_BucketAction]] = {}
        for usage in report.bucket_quota_usages:
            key_id = usage.bucket_id.bucket.get(BUCKET_KEY)
            if key_id is None:  # not a bucket of ours: Envoy is told to forget it
                out.setdefault(stream.sid, []).append(_abandon(usage.bucket_id))
                continue
            bucket = stream.buckets.get(key_id)
            if bucket is None:
                bucket = stream.buckets[key_id] = _Bucket(bucket_id=usage.bucket_id, last_busy=now)
            bucket.record(now, usage.num_requests_allowed + usage.num_requests_denied)
            reported.append(key_id)
        idle = [key for key in reported if now - stream.buckets[key].last_busy > self._idle_s]
        for key in idle:
            out.setdefault(stream.sid, []).append(_abandon(stream.buckets.pop(key).bucket_id))
        for sid, actions in self._resplit(set(reported), refresh=stream).items():
            out.setdefault(sid, []).extend(actions)
        self._send(out)

    def _close(self, stream: _Stream) -> None:
        if self._streams.pop(stream.sid, None) is None:
            return
        self._send(self._resplit(set(stream.buckets)))

    def _policy(self, key_id: str) -> Assignment | int:
        """The key's limit, or the blanket rule that replaces it."""
        if not key_id or len(key_id) > MAX_KEY_ID_LENGTH:
            return DENY_ALL
        try:
            limit = self._limit_of(key_id)
        except LookupError:
            return DENY_ALL
        if limit is None:
            return ALLOW_ALL
        return limit if limit > 0 else DENY_ALL

    def _resplit(
        self, keys: Iterable[str], *, force: bool = False, refresh: _Stream | None = None
    ) -> dict[int, list[_BucketAction]]:
        """The actions that bring every holder of `keys` to its share: for changed assignments, and for
        every bucket of `refresh` (the stream that just reported) to renew their time to live. `force`:
        keys whose limit changed get their exact shares (see _assignment)."""
        out: dict[int, list[_BucketAction]] = {}
        for key_id in keys:
            holders = [s for s in self._streams.values() if key_id in s.buckets]
            if not holders:
                self._policies.pop(key_id, None)
                continue
            policy = self._policy(key_id)
            # Exact new shares only for a key whose limit changed: the others keep their running
            # buckets (a new one starts full), as on a report.
            exact = force and self._policies.get(key_id) != policy
            self._policies[key_id] = policy
            if isinstance(policy, int):
                demands = {s.sid: s.buckets[key_id].demand() for s in holders}
                shares = self._split.split(policy, demands)
            for stream in holders:
                bucket = stream.buckets[key_id]
                if isinstance(policy, Assignment):
                    bucket.share, new = None, policy
                else:
                    bucket.share = shares[stream.sid]
                    new = self._assignment(bucket.share, bucket.sent, exact)
                if new != bucket.sent or stream is refresh:
                    bucket.sent = new
                    out.setdefault(stream.sid, []).append(self._action(bucket.bucket_id, new))
        return out

    @staticmethod
    def _assignment(share: float, old: Assignment | None, exact: bool) -> Assignment:
        tb = token_bucket_for(share)
        if tb is None:
            return DENY_ALL
        old_tb = old.bucket if old is not None else None
        if old_tb is not None and math.isclose(old_tb.per_minute, tb.per_minute):
            return Assignment("token_bucket", old_tb)  # the same rate: the running bucket stays
        if old_tb is not None and not exact:
            rate = old_tb.per_minute
            if share * (1 - KEEP_BELOW) <= rate <= share * (1 + KEEP_ABOVE):
                return Assignment("token_bucket", old_tb)
        return Assignment("token_bucket", distinct_from(tb, old_tb))

    def _action(self, bucket_id: rlqs_pb2.BucketId, assignment: Assignment) -> _BucketAction:
        action = _BucketAction(bucket_id=bucket_id)
        quota = action.quota_assignment_action
        quota.assignment_time_to_live.seconds = self._ttl_s
        strategy = quota.rate_limit_strategy
        if assignment.action == "allow_all":
            strategy.blanket_rule = _Strategy.ALLOW_ALL
        elif assignment.action == "deny_all" or assignment.bucket is None:
            strategy.blanket_rule = _Strategy.DENY_ALL
        else:
            tb = assignment.bucket
            strategy.token_bucket.max_tokens = tb.max_tokens
            strategy.token_bucket.tokens_per_fill.value = tb.tokens_per_fill
            strategy.token_bucket.fill_interval.seconds = tb.fill_interval_s
        return action

    def _send(self, actions: dict[int, list[_BucketAction]]) -> None:
        for sid, batch in actions.items():
            stream = self._streams.get(sid)
            if stream is not None and batch:
                stream.outbox.put_nowait(_Response(bucket_action=batch))

    # Figures
    def snapshot(self) -> dict[str, dict[int, BucketFigures]]:
        """Per key id, per stream: demand, share and what was assigned."""
        out: dict[str, dict[int, BucketFigures]] = {}
        for stream in self._streams.values():
            for key_id, bucket in stream.buckets.items():
                policy = self._policy(key_id)
                sent = bucket.sent
                out.setdefault(key_id, {})[stream.sid] = BucketFigures(
                    key_id=key_id,
                    stream=stream.sid,
                    peer=stream.peer,
                    limit=policy if isinstance(policy, int) else None,
                    demand_per_minute=bucket.demand(),
                    share_per_minute=bucket.share,
                    assigned_per_minute=sent.per_minute if sent else None,
                    action=sent.action if sent else None,
                )
        return out

    def stream_count(self) -> int:
        return len(self._streams)


def _abandon(bucket_id: rlqs_pb2.BucketId) -> _BucketAction:
    action = _BucketAction(bucket_id=bucket_id)
    action.abandon_action.SetInParent()
    return action


def add_quota_servicer(server: grpc.aio.Server, servicer: QuotaServicer) -> None:
    rlqs_pb2_grpc.add_RateLimitQuotaServiceServicer_to_server(servicer, server)
