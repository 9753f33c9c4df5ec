"""How one key's requests-per-minute limit is shared between the Envoys that serve it, and how a share
becomes a token bucket Envoy 1.40's `rate_limit_quota` filter can enforce.

Pure functions and small value types; the quota server (quota.py) calls them on every usage report.

The split contract (`QuotaSplit.split(limit, demands)`), in requests per minute:
- every stream named in `demands` gets a share ≥ 0, and the shares add up to at most `limit`;
- a stream asking for less than an even share gets what it asks for (with some headroom, so a growing
  demand shows up in its next report instead of being cut at today's level);
- the rest is shared evenly between the others (max-min fairness): a stream with more demand never gets
  less than one with less;
- a demand of None (not measured yet: a bucket seen in one report only) asks for at least an even share;
- what nobody asks for is spread evenly over all streams, so an idle Envoy can still start serving the key
  at once, and the whole limit stays assigned.

Envoy's token bucket (envoy.type.v3.TokenBucket as the RLQS filter reads it in 1.40): `fill_interval` counts
whole seconds only (a sub-second interval becomes 0 and turns the limit off), the rate is
`tokens_per_fill / fill_interval` tokens per second (refilled continuously), the bucket starts full, and an
assignment whose `max_tokens` and `tokens_per_fill` equal the last one keeps the running bucket even when
`fill_interval` differs (Envoy compares only its nanoseconds). `token_bucket_for` picks the whole-second
bucket closest to a share without going over it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

S = TypeVar("S", bound=Hashable)

# A share converts to a bucket within this fraction under it, with the shortest fill interval that does
# (a short interval keeps the burst small: max_tokens is one interval's worth).
BUCKET_TOLERANCE = 0.02
# Shares below one request per this many seconds get no bucket (the quota server denies them).
LONGEST_FILL_S = 3600


class QuotaSplit(Protocol):
    def split(self, limit: float, demands: Mapping[S, float | None]) -> dict[S, float]:
        """Shares of `limit` (requests per minute) per stream, by demand (requests per minute, allowed
        and denied; None when not measured yet). See the module's contract."""
        ...


@dataclass(frozen=True)
class MaxMinSplit:
    """Water-filling: small demands are met (times `headroom`), the rest is split evenly."""

    headroom: float = 1.25

    def split(self, limit: float, demands: Mapping[S, float | None]) -> dict[S, float]:
        if not demands:
            return {}
        limit = max(0.0, float(limit))
        wants = {s: math.inf if d is None else max(0.0, d) * self.headroom for s, d in demands.items()}
        shares: dict[S, float] = {}
        left = limit
        todo = dict(wants)
        while todo:
            fair = left / len(todo)
            met = {s: w for s, w in todo.items() if w <= fair}
            if not met:
                for s in todo:
                    shares[s] = fair
                left = 0.0
                break
            for s, w in met.items():
                shares[s] = w
                left -= w
                del todo[s]
        if left > 0:  # every demand met: hand out the rest evenly
            extra = left / len(shares)
            for s in shares:
                shares[s] += extra
        # Float sums may overshoot by an ulp: never hand out more than the limit.
        total = sum(shares.values())
        if total > limit > 0:
            scale = limit / total
            shares = {s: v * scale for s, v in shares.items()}
        return shares


@dataclass(frozen=True)
class WholeSecondBucket:
    """A token bucket as Envoy receives it: `tokens_per_fill` tokens every `fill_interval_s` seconds,
    holding at most `max_tokens`."""

    tokens_per_fill: int
    fill_interval_s: int
    max_tokens: int

    @property
    def per_minute(self) -> float:
        return 60.0 * self.tokens_per_fill / self.fill_interval_s


def token_bucket_for(
    share_per_minute: float, tolerance: float = BUCKET_TOLERANCE
) -> WholeSecondBucket | None:
    """The whole-second bucket with the highest rate not above the share, preferring the shortest fill
    interval whose rate is within `tolerance` of the share; when none is, the closest (then under one
    request per minute below it, as a 60 s interval shows). None: less than one request per
    LONGEST_FILL_S."""
    if share_per_minute <= 0:
        return None
    if share_per_minute < 1.0:  # one token per interval of more than a minute
        interval = math.ceil(60.0 / share_per_minute - 1e-9)
        return None if interval > LONGEST_FILL_S else WholeSecondBucket(1, interval, 1)
    best: WholeSecondBucket | None = None
    for interval in range(1, 61):
        tokens = math.floor(share_per_minute * interval / 60.0 + 1e-9)
        if tokens < 1 or 60.0 * tokens / interval > share_per_minute * (1 + 1e-9):
            continue
        candidate = WholeSecondBucket(tokens, interval, tokens)
        if candidate.per_minute >= share_per_minute * (1 - tolerance):
            return candidate
        if best is None or candidate.per_minute > best.per_minute:
            best = candidate
    return best


def distinct_from(new: WholeSecondBucket, old: WholeSecondBucket | None) -> WholeSecondBucket:
    """`new`, changed so that Envoy replaces `old`'s running bucket: Envoy 1.40 keeps the running bucket
    when max_tokens and tokens_per_fill are unchanged, whatever fill_interval says."""
    if (
        old is not None
        and new.fill_interval_s != old.fill_interval_s
        and (new.max_tokens, new.tokens_per_fill) == (old.max_tokens, old.tokens_per_fill)
    ):
        return WholeSecondBucket(new.tokens_per_fill, new.fill_interval_s, new.max_tokens + 1)
    return new
