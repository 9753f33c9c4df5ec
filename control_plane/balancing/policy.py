"""Weight policies (scores → integer EDS weights) and the controller that rate-limits their changes.

See the package docstring for the contract. Everything here is pure but for ``WeightController``'s
memory of what it last published; the clock is injected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from control_plane.balancing.scorers import FleetView, KvCacheScorer, LatencyScorer, QueueScorer, Scorer
from control_plane.errors import GatewayError
from control_plane.telemetry.signals import EndpointSignals

DEFAULT_MAX_WEIGHT = 100
DEFAULT_MAX_AGE_S = 10.0

SignalsByEndpoint = Mapping[str, EndpointSignals | None]


class UnknownPolicyError(GatewayError, ValueError):
    """A weight policy name that is not registered."""


@dataclass(frozen=True, slots=True)
class EndpointScore:
    """How the policy judged one endpoint (for logs and the admin API)."""

    endpoint_id: str
    score: float | None
    """Combined score in [0, 1]; ``None``: neutral (see ``reason``)."""
    reason: str
    """``scored``, ``missing`` (no signals), ``stale`` or ``unscorable`` (no scorer could use them)."""
    by_scorer: tuple[tuple[str, float | None], ...] = ()


class WeightPolicy:
    """Weighted scorers → integer weights in [1, max_weight] for one group of endpoints (one cluster).

    ``scorers``: ``(scorer, importance)`` pairs; an endpoint's combined score is the importance-weighted
    mean of the scores it got (scorers returning ``None`` are left out of its mean).
    """

    def __init__(
        self,
        scorers: Sequence[tuple[Scorer, float]],
        max_weight: int = DEFAULT_MAX_WEIGHT,
        *,
        name: str = "custom",
    ) -> None:
        if not scorers:
            raise ValueError("a policy needs at least one scorer")
        for scorer, importance in scorers:
            if not (math.isfinite(importance) and importance > 0):
                raise ValueError(f"importance of scorer {scorer.name!r} must be a finite number > 0")
        if max_weight < 1:
            raise ValueError("max_weight must be >= 1")
        self.scorers = tuple(scorers)
        self.max_weight = max_weight
        self.name = name

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}={w:g}" for s, w in self.scorers)
        return f"WeightPolicy({self.name}: {parts}, max_weight={self.max_weight})"

    def evaluate(
        self,
        signals_by_endpoint: SignalsByEndpoint,
        endpoint_ids: Collection[str],
        now: float,
        max_age_s: float,
    ) -> dict[str, EndpointScore]:
        """The combined score of each of ``endpoint_ids``, which form one group (one model's cluster)."""
        fresh: dict[str, EndpointSignals] = {}
        out: dict[str, EndpointScore] = {}
        for endpoint_id in endpoint_ids:
            signals = signals_by_endpoint.get(endpoint_id)
            if signals is None:
                out[endpoint_id] = EndpointScore(endpoint_id, None, "missing")
            elif not signals.is_fresh(now, max_age_s):
                out[endpoint_id] = EndpointScore(endpoint_id, None, "stale")
            else:
                fresh[endpoint_id] = signals
        fleet = FleetView(fresh.values())
        for endpoint_id, signals in fresh.items():
            parts: list[tuple[str, float | None]] = []
            total = weight_sum = 0.0
            for scorer, importance in self.scorers:
                value = scorer.score(signals, fleet)
                parts.append((scorer.name, value))
                if value is not None:
                    total += importance * value
                    weight_sum += importance
            if weight_sum > 0:
                out[endpoint_id] = EndpointScore(endpoint_id, total / weight_sum, "scored", tuple(parts))
            else:
                out[endpoint_id] = EndpointScore(endpoint_id, None, "unscorable", tuple(parts))
        return out

    def weights(
        self,
        signals_by_endpoint: SignalsByEndpoint,
        static_weights: Mapping[str, int],
        now: float,
        max_age_s: float,
    ) -> dict[str, int]:
        """Weights of the endpoints of ``static_weights`` (the authority on which endpoints exist), taken
        as ONE group: call it per model, or use ``weights_for_groups``.

        Signals of endpoints not in ``static_weights`` are ignored. Neutral endpoints (stale, missing or
        unscorable signals) get the group's mean score; a group with no scored endpoint gets
        ``static_weights`` unchanged.
        """
        scores = self.evaluate(signals_by_endpoint, list(static_weights), now, max_age_s)
        scored = [s.score for s in scores.values() if s.score is not None]
        if not scored:
            return dict(static_weights)
        neutral = math.fsum(scored) / len(scored)
        raw = {
            endpoint_id: max(1, static)
            * (score if (score := scores[endpoint_id].score) is not None else neutral)
            for endpoint_id, static in static_weights.items()
        }
        top = max(raw.values())
        if top <= 0:  # every endpoint scored 0: nothing to tell them apart by
            raw = {endpoint_id: float(max(1, static)) for endpoint_id, static in static_weights.items()}
            top = max(raw.values())
        return {
            endpoint_id: min(self.max_weight, max(1, round(value / top * self.max_weight)))
            for endpoint_id, value in raw.items()
        }

    def weights_for_groups(
        self,
        groups: Mapping[str, Collection[str]],
        signals_by_endpoint: SignalsByEndpoint,
        static_weights: Mapping[str, int],
        now: float,
        max_age_s: float,
    ) -> dict[str, int]:
        """``weights`` per group (group name → endpoint ids, e.g. model id → its endpoints), merged.

        Endpoints of ``static_weights`` in no group form one more group; ids of a group that are not in
        ``static_weights`` are ignored.
        """
        out: dict[str, int] = {}
        grouped: set[str] = set()
        for members in groups.values():
            group_static = {e: static_weights[e] for e in members if e in static_weights}
            grouped.update(group_static)
            out.update(self.weights(signals_by_endpoint, group_static, now, max_age_s))
        rest = {e: w for e, w in static_weights.items() if e not in grouped}
        if rest:
            out.update(self.weights(signals_by_endpoint, rest, now, max_age_s))
        return out


class WeightController:
    """Publishes a policy's weights only on significant changes, at most once per ``min_interval_s``.

    ``update`` returns the complete new weight map (for every endpoint of ``static_weights``) when
    - the endpoint set or a static weight changed since the last publication (published at once), or
    - some endpoint's weight moved by more than ``hysteresis`` x max(old, new) from the last published
      map, and ``min_interval_s`` passed since the last publication;
    otherwise ``None``. Weights are compared as shares of their map's largest weight, as Envoy only
    uses their ratios. Before the first publication the baseline is ``static_weights`` (what Envoy has
    without a policy), so a policy that keeps the static proportions never publishes.
    """

    def __init__(
        self,
        policy: WeightPolicy,
        min_interval_s: float = 2.0,
        hysteresis: float = 0.2,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval_s < 0:
            raise ValueError("min_interval_s must be >= 0")
        if hysteresis < 0:
            raise ValueError("hysteresis must be >= 0")
        self.policy = policy
        self.min_interval_s = min_interval_s
        self.hysteresis = hysteresis
        self.max_age_s = max_age_s
        self._clock = clock
        self._published: dict[str, int] | None = None
        self._published_at: float | None = None
        self._static: dict[str, int] | None = None

    @property
    def current(self) -> dict[str, int] | None:
        """The last published weights (``None`` before the first publication)."""
        return dict(self._published) if self._published is not None else None

    def reset(self) -> None:
        """Forget what was published (e.g. when the policy is switched off)."""
        self._published = self._published_at = self._static = None

    def moved(self, old: Mapping[str, int], new: Mapping[str, int]) -> bool:
        """Whether some endpoint's weight, relative to its map's largest, moved by more than the
        hysteresis fraction (so ``{a: 1, b: 1}`` and ``{a: 100, b: 100}`` are the same shares)."""
        old_top = max(old.values(), default=1) or 1
        new_top = max(new.values(), default=1) or 1
        for endpoint_id, weight in new.items():
            before, after = old[endpoint_id] / old_top, weight / new_top
            if abs(after - before) > self.hysteresis * max(before, after):
                return True
        return False

    def update(
        self,
        signals_by_endpoint: SignalsByEndpoint,
        static_weights: Mapping[str, int],
        now: float | None = None,
        max_age_s: float | None = None,
        *,
        groups: Mapping[str, Collection[str]] | None = None,
    ) -> dict[str, int] | None:
        """New weights to publish, or ``None``. ``now`` defaults to the injected clock and serves for both
        signal freshness and the interval; ``groups``: model id → endpoint ids (default: one group)."""
        now = self._clock() if now is None else now
        max_age = self.max_age_s if max_age_s is None else max_age_s
        if groups is None:
            new = self.policy.weights(signals_by_endpoint, static_weights, now, max_age)
        else:
            new = self.policy.weights_for_groups(groups, signals_by_endpoint, static_weights, now, max_age)
        static = dict(static_weights)
        if self._published is None:
            baseline, structural = static, False
        else:
            # The published overlay was computed for another endpoint set or other static weights.
            baseline = self._published
            structural = set(new) != set(baseline) or static != self._static
        if new == baseline:
            self._static = static
            return None
        if not structural:
            if not self.moved(baseline, new):
                return None
            if self._published_at is not None and now - self._published_at < self.min_interval_s:
                return None
        self._published, self._published_at, self._static = new, now, static
        return dict(new)


_POLICIES: Mapping[str, Callable[[int], WeightPolicy | None]] = MappingProxyType(
    {
        "none": lambda max_weight: None,
        "queue": lambda max_weight: WeightPolicy([(QueueScorer(), 1.0)], max_weight, name="queue"),
        "telemetry": lambda max_weight: WeightPolicy(
            [(QueueScorer(), 0.5), (KvCacheScorer(), 0.25), (LatencyScorer(), 0.25)],
            max_weight,
            name="telemetry",
        ),
    }
)


def policy_names() -> tuple[str, ...]:
    """The names ``make_policy`` accepts."""
    return tuple(_POLICIES)


def make_policy(name: str, max_weight: int = DEFAULT_MAX_WEIGHT) -> WeightPolicy | None:
    """The registered policy ``name``; ``None`` for ``none`` (static weights, no controller needed)."""
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(
            f"unknown weight policy {name!r}; choose one of {', '.join(_POLICIES)}"
        ) from None
    return factory(max_weight)
