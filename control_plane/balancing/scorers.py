"""Scorers: one endpoint's signals → a score in [0, 1] (1 = most spare capacity), or ``None``.

Scorers are small immutable objects with a ``name``. The optional ``fleet`` argument holds the fresh
signals of the endpoints of the same model, for scores relative to the peers; without it, scorers fall
back to absolute references.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from control_plane.telemetry.signals import EndpointSignals


class FleetView:
    """Fresh signals of the endpoints of one group (one model's cluster)."""

    def __init__(self, signals: Iterable[EndpointSignals]) -> None:
        self.signals = tuple(signals)

    def __len__(self) -> int:
        return len(self.signals)

    def values(self, field: str) -> list[float]:
        """The known, finite values of one ``EndpointSignals`` field."""
        out = []
        for signals in self.signals:
            value = getattr(signals, field)
            if value is not None and math.isfinite(value):
                out.append(float(value))
        return out

    def mean(self, field: str) -> float | None:
        values = self.values(field)
        return math.fsum(values) / len(values) if values else None

    def min(self, field: str) -> float | None:
        values = self.values(field)
        return min(values) if values else None

    def max(self, field: str) -> float | None:
        values = self.values(field)
        return max(values) if values else None


class Scorer(Protocol):
    """Maps one endpoint's signals to [0, 1] (1 = most capacity), or ``None`` without the signals it needs."""

    @property
    def name(self) -> str: ...

    def score(self, signals: EndpointSignals, fleet: FleetView | None = None) -> float | None: ...


def _clamp(value: float) -> float:
    if math.isnan(value):
        return 0.0
    return min(1.0, max(0.0, value))


@dataclass(frozen=True, slots=True)
class QueueScorer:
    """Falls with the requests waiting for a batch slot, relative to the fleet's shortest queue.

    ``score = (scale + best) / (scale + queue)``, where ``best`` is the fleet's smallest queue depth (0
    without a fleet, which gives ``1 / (1 + queue / scale)``) and ``scale`` softens small queues. The
    least-queued replica scores 1; with ``scale`` 4, one with 4 more waiting than the best scores 0.5,
    one with 12 more 0.25. A waiting queue on a continuous-batching server means its batch is full, so
    new requests sent there wait; a uniformly queued fleet scores 1 everywhere, whatever the depth.
    """

    scale: float = 4.0
    name: str = "queue"

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError("scale must be > 0")

    def score(self, signals: EndpointSignals, fleet: FleetView | None = None) -> float | None:
        queue = signals.queue_depth
        if queue is None or not math.isfinite(queue):
            return None
        best = max(0.0, fleet.min("queue_depth") or 0.0) if fleet is not None else 0.0
        return _clamp((self.scale + best) / (self.scale + max(0.0, queue)))


@dataclass(frozen=True, slots=True)
class KvCacheScorer:
    """``1 - kv_cache_usage``: a replica with a full KV cache must preempt or queue new requests."""

    name: str = "kv_cache"

    def score(self, signals: EndpointSignals, fleet: FleetView | None = None) -> float | None:
        usage = signals.kv_cache_usage
        if usage is None or not math.isfinite(usage):
            return None
        return _clamp(1.0 - usage)


@dataclass(frozen=True, slots=True)
class LatencyScorer:
    """Lower recent mean latency → higher score: ``reference / own``, clamped to [0, 1].

    Uses the first of ``fields`` the endpoint has (time per output token first: it does not depend on
    how long the answers were; then end-to-end latency). The reference is the fleet's best value of the
    same field, or ``reference_s`` without a fleet: a replica three times slower than the best scores 1/3.
    """

    fields: tuple[str, ...] = ("time_per_token_seconds_mean", "e2e_seconds_mean")
    reference_s: float | None = None
    name: str = "latency"

    def score(self, signals: EndpointSignals, fleet: FleetView | None = None) -> float | None:
        for field in self.fields:
            own = getattr(signals, field)
            if own is None or not math.isfinite(own):
                continue
            reference = fleet.min(field) if fleet is not None else None
            if reference is None:
                reference = self.reference_s
            if reference is None:
                return None
            if own <= 0:
                return 1.0
            return _clamp(reference / own)
        return None


@dataclass(frozen=True, slots=True)
class GpuMemoryScorer:
    """Free share of GPU memory, ``free / (used + free)``. Not in the default policies: inference engines
    reserve their memory up front (vLLM's ``--gpu-memory-utilization``), so this mostly tells apart
    replicas sharing a GPU with other work."""

    name: str = "gpu_memory"

    def score(self, signals: EndpointSignals, fleet: FleetView | None = None) -> float | None:
        used, free = signals.gpu_memory_used_bytes, signals.gpu_memory_free_bytes
        if used is None or free is None or used + free <= 0:
            return None
        return _clamp(free / (used + free))
