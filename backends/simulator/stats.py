"""Counters and histograms the engine keeps; ``metrics.py`` renders them under each engine's names."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""Seconds; vLLM's time-to-first-token buckets, extended."""
E2E_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
)  # fmt: skip
"""Seconds; vLLM's request-latency buckets with a few sub-second ones in front."""
TPOT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
"""Seconds per output token."""
TOKEN_COUNT_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(16))
"""Token counts 1 .. 32768."""


@dataclass(slots=True)
class Histogram:
    """A cumulative-bucket histogram (Prometheus semantics; ``+Inf`` is implicit)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(self.bounds):
            raise ValueError("histogram bounds must be sorted")
        if not self.counts:
            self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.bounds):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` pairs, ending with ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append((bound, running))
        out.append((float("inf"), self.count))
        return out


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters and histograms of one engine (gauges are read live from the engine)."""

    requests: int = 0
    """Requests received on generation/embedding routes (including ones that failed)."""
    successes: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    """Failed requests by kind: validation, overloaded, generation, cancelled."""
    finished: Counter[str] = field(default_factory=Counter)
    """Successful requests by finish reason (length, stop)."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    inference_time: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    input_length: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
    generated_length: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))

    @property
    def failed(self) -> int:
        return sum(self.failures.values())
