"""The normalised load signals of one endpoint, whatever engine produced them.

Every signal is optional: an engine that does not export something (TEI has no KV cache), a metric that
is missing, or a GPU exporter that is unreachable leaves it ``None``. Times are ``time.monotonic()``
seconds; units are fixed here (fractions in 0..1, bytes, seconds) and converted by the metric map.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class HistogramTotals:
    """Cumulative ``_sum`` and ``_count`` of a latency histogram, kept to derive means between scrapes."""

    signal: str
    """The histogram signal: ``ttft_seconds``, ``e2e_seconds`` or ``time_per_token_seconds``; or
    ``prefix_cache_hit_rate`` read from counters (``sum``: hits, ``count``: queries)."""
    sum: float
    count: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSignals:
    """GPU telemetry (DCGM exporter or NVML), aggregated over the GPUs of one endpoint."""

    utilization: float | None = None
    """0..1 (DCGM and NVML report percent)."""
    memory_used_bytes: float | None = None
    memory_free_bytes: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointSignals:
    """What one endpoint reported about its load, at ``scraped_at``."""

    scraped_at: float
    """``time.monotonic()`` when the answer was read."""
    queue_depth: float | None = None
    """Requests waiting for a batch slot."""
    running: float | None = None
    """Requests in the running batch."""
    kv_cache_usage: float | None = None
    """0..1: share of the KV cache in use."""
    gpu_utilization: float | None = None
    """0..1."""
    gpu_memory_used_bytes: float | None = None
    gpu_memory_free_bytes: float | None = None
    ttft_seconds_mean: float | None = None
    """Mean time to first token of the requests finished between the previous scrape and this one."""
    e2e_seconds_mean: float | None = None
    """Mean end-to-end latency of the requests finished between the previous scrape and this one."""
    time_per_token_seconds_mean: float | None = None
    """Mean time per output token of the requests finished between the previous scrape and this one."""
    prefix_cache_hit_rate: float | None = None
    """0..1: share of prompt tokens found in the engine's prefix cache (vLLM: between the previous scrape
    and this one; SGLang: as the engine reports it)."""
    histograms: tuple[HistogramTotals, ...] = ()
    """Cumulative histogram totals of this scrape (input of the next scrape's means)."""

    def is_fresh(self, now: float, max_age_s: float) -> bool:
        """Whether these signals are at most ``max_age_s`` old at ``now`` (same monotonic clock)."""
        return now - self.scraped_at <= max_age_s

    def age(self, now: float) -> float:
        return now - self.scraped_at

    def histogram(self, signal: str) -> HistogramTotals | None:
        for totals in self.histograms:
            if totals.signal == signal:
                return totals
        return None

    @property
    def gpu(self) -> GpuSignals:
        return GpuSignals(
            utilization=self.gpu_utilization,
            memory_used_bytes=self.gpu_memory_used_bytes,
            memory_free_bytes=self.gpu_memory_free_bytes,
        )

    def with_gpu(self, gpu: GpuSignals | None) -> EndpointSignals:
        """These signals with the GPU fields replaced by ``gpu`` (all ``None`` when ``gpu`` is None)."""
        gpu = gpu or GpuSignals()
        return replace(
            self,
            gpu_utilization=gpu.utilization,
            gpu_memory_used_bytes=gpu.memory_used_bytes,
            gpu_memory_free_bytes=gpu.memory_free_bytes,
        )

    @property
    def has_load_signals(self) -> bool:
        """Whether any engine signal (queue, batch, KV cache, latency) is known."""
        return any(
            value is not None
            for value in (
                self.queue_depth,
                self.running,
                self.kv_cache_usage,
                self.ttft_seconds_mean,
                self.e2e_seconds_mean,
                self.time_per_token_seconds_mean,
            )
        )
