"""Prometheus text exposition → ``EndpointSignals``. Pure functions: no I/O, no clock, no globals.

Samples are looked up by their sample name as written on the wire (``vllm:num_requests_waiting``,
``tgi_request_duration_sum``), not by family name, so the parser's renaming of counter families does not
matter. NaN and infinite samples are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from control_plane.telemetry.errors import MetricsParseError, UnknownEngineError
from control_plane.telemetry.metric_map import (
    RATE_SIGNAL,
    Aggregate,
    CounterRatioSpec,
    EngineMetrics,
    GaugeSpec,
    HistogramSpec,
    MetricMap,
)
from control_plane.telemetry.signals import EndpointSignals, GpuSignals, HistogramTotals


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Mapping[str, str]
    value: float


Samples = Mapping[str, list[Sample]]
"""Sample name → its samples (one per label set)."""


def parse_exposition(text: str) -> dict[str, list[Sample]]:
    """Every finite sample of ``text`` by sample name; ``MetricsParseError`` on malformed text."""
    out: dict[str, list[Sample]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = float(sample.value)
                if math.isfinite(value):
                    out.setdefault(sample.name, []).append(Sample(sample.labels, value))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise MetricsParseError(f"not Prometheus text exposition: {exc or type(exc).__name__}") from None
    return out


def _matches(sample: Sample, labels: Mapping[str, str] | None) -> bool:
    return not labels or all(sample.labels.get(k) == v for k, v in labels.items())


def _aggregate(values: list[float], how: Aggregate) -> float:
    if how == "sum":
        return math.fsum(values)
    if how == "mean":
        return math.fsum(values) / len(values)
    if how == "max":
        return max(values)
    return min(values)


def read_gauge(samples: Samples, spec: GaugeSpec, labels: Mapping[str, str] | None = None) -> float | None:
    """The first of ``spec.metrics`` with samples (matching ``labels``), aggregated and scaled."""
    for name in spec.metrics:
        values = [s.value for s in samples.get(name, ()) if _matches(s, labels)]
        if values:
            return _aggregate(values, spec.aggregate) * spec.scale
    return None


def read_histogram(samples: Samples, signal: str, spec: HistogramSpec) -> HistogramTotals | None:
    """Cumulative sum and count of the first of ``spec.metrics`` present, over all its label sets."""
    for name in spec.metrics:
        counts = samples.get(f"{name}_count")
        sums = samples.get(f"{name}_sum")
        if counts and sums:
            return HistogramTotals(
                signal=signal,
                sum=math.fsum(s.value for s in sums) * spec.scale,
                count=math.fsum(s.value for s in counts),
            )
    return None


def _first_sum(samples: Samples, names: tuple[str, ...]) -> float | None:
    for name in names:
        values = samples.get(name)
        if values:
            return math.fsum(s.value for s in values)
    return None


def read_ratio(samples: Samples, signal: str, spec: CounterRatioSpec) -> HistogramTotals | None:
    """Cumulative hits (as ``sum``) and queries (as ``count``) of a counter ratio, if both are present."""
    hits = _first_sum(samples, spec.hits)
    queries = _first_sum(samples, spec.queries)
    if hits is None or queries is None:
        return None
    return HistogramTotals(signal=signal, sum=hits, count=queries)


def _hit_rate(
    samples: Samples, spec: EngineMetrics, previous: EndpointSignals | None
) -> tuple[float | None, HistogramTotals | None]:
    """The prefix-cache hit rate: a gauge as read, or a counter ratio between this scrape and the last."""
    rate = spec.prefix_cache_hit_rate
    if isinstance(rate, GaugeSpec):
        return read_gauge(samples, rate), None
    if rate is None:
        return None, None
    totals = read_ratio(samples, RATE_SIGNAL, rate)
    if totals is None:
        return None, None
    carried = previous.prefix_cache_hit_rate if previous is not None else None
    return mean_between(totals, previous, carried), totals


def mean_between(
    current: HistogramTotals, previous: EndpointSignals | None, previous_mean: float | None
) -> float | None:
    """Mean of the observations between ``previous``'s totals and ``current``.

    No previous totals: unknown. No new observation: the previous mean is carried. A counter that went
    back (server restart): unknown until the next scrape.
    """
    before = previous.histogram(current.signal) if previous is not None else None
    if before is None:
        return None
    d_count = current.count - before.count
    d_sum = current.sum - before.sum
    if d_count == 0 and d_sum == 0:
        return previous_mean
    if d_count <= 0 or d_sum < 0:
        return None
    return d_sum / d_count


def gpu_from_samples(
    samples: Samples, metric_map: MetricMap, labels: Mapping[str, str] | None = None
) -> GpuSignals:
    gauges = metric_map.gpu.gauges()

    def read(signal: str) -> float | None:
        spec = gauges.get(signal)
        return read_gauge(samples, spec, labels) if spec is not None else None

    return GpuSignals(
        utilization=read("gpu_utilization"),
        memory_used_bytes=read("gpu_memory_used_bytes"),
        memory_free_bytes=read("gpu_memory_free_bytes"),
    )


def gpu_signals_from_text(
    text: str, metric_map: MetricMap, *, labels: Mapping[str, str] | None = None
) -> GpuSignals:
    """GPU signals of a DCGM exporter's answer; ``labels`` keeps only matching samples (e.g. one GPU)."""
    return gpu_from_samples(parse_exposition(text), metric_map, labels)


def signals_from_text(
    text: str,
    engine: str,
    metric_map: MetricMap,
    now: float,
    *,
    previous: EndpointSignals | None = None,
    gpu: bool = True,
    gpu_labels: Mapping[str, str] | None = None,
) -> EndpointSignals:
    """The signals of one engine's /metrics answer, read at ``now`` (monotonic seconds).

    ``previous``: the same endpoint's previous signals, to derive mean latencies from histogram deltas.
    ``gpu``: also read the GPU section from this text (the simulator and some setups export DCGM names on
    the same /metrics); ``gpu_labels`` restricts those samples. Raises ``MetricsParseError`` for
    malformed text and ``UnknownEngineError`` for an engine the map does not know.
    """
    spec = metric_map.engine(engine)
    if spec is None:
        raise UnknownEngineError(engine, list(metric_map.engines))
    samples = parse_exposition(text)
    gauges = {name: read_gauge(samples, gauge) for name, gauge in spec.gauges().items()}
    histograms = [
        totals
        for name, hist in spec.histograms().items()
        if (totals := read_histogram(samples, name, hist)) is not None
    ]
    means: dict[str, float | None] = {}
    for totals in histograms:
        field = f"{totals.signal}_mean"
        carried = getattr(previous, field) if previous is not None else None
        means[field] = mean_between(totals, previous, carried)
    hit_rate, hit_totals = _hit_rate(samples, spec, previous)
    if hit_totals is not None:
        histograms.append(hit_totals)
    signals = EndpointSignals(
        scraped_at=now,
        prefix_cache_hit_rate=hit_rate,
        queue_depth=gauges.get("queue_depth"),
        running=gauges.get("running"),
        kv_cache_usage=gauges.get("kv_cache_usage"),
        ttft_seconds_mean=means.get("ttft_seconds_mean"),
        e2e_seconds_mean=means.get("e2e_seconds_mean"),
        time_per_token_seconds_mean=means.get("time_per_token_seconds_mean"),
        histograms=tuple(histograms),
    )
    return signals.with_gpu(gpu_from_samples(samples, metric_map, gpu_labels)) if gpu else signals
