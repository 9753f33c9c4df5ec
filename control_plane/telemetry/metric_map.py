"""Which Prometheus metrics give which signal: the schema and loader of ``metric_map.yaml``.

The mapping is data. For each engine kind, each signal names the metrics to try, in order (the first one
present in the exposition wins, e.g. vLLM's ``vllm:kv_cache_usage_perc`` and the older
``vllm:gpu_cache_usage_perc``), how several samples of that metric are combined (``sum``, ``mean``,
``max``, ``min``: several GPUs, several ``model_name`` or ``engine`` labels) and a ``scale`` factor to the
signal's unit (DCGM's percent → 0..1, MiB → bytes). Histogram signals name histograms whose ``_sum`` and
``_count`` give mean latencies between two scrapes. ``prefix_cache_hit_rate`` is either a gauge (SGLang's
``sglang:cache_hit_rate``) or a ratio of two counters, ``{hits: [names], queries: [names]}`` (vLLM's
``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total``), read as Δhits / Δqueries between
two scrapes. The ``gpu`` section is read for every engine (from
the server's own /metrics or from a separate DCGM exporter).

A signal given as a bare list of names is ``{metrics: [names]}``; a gauge signal without ``aggregate``
takes its signal's default (``DEFAULT_AGGREGATE``: sum, or mean for usage and utilisation), and
``scale`` defaults to 1.

An operator's file has the same format. By default it is layered over the packaged mapping: the engines
it names replace the packaged ones whole, its ``gpu`` section (when given) replaces the packaged one;
``inherit_defaults: false`` makes it the whole mapping.
"""

from __future__ import annotations

import importlib.resources
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from control_plane.config.loader import validation_problems
from control_plane.telemetry.errors import MetricMapError

PACKAGED_MAP = "metric_map.yaml"

Aggregate = Literal["sum", "mean", "max", "min"]

GAUGE_SIGNALS = ("queue_depth", "running", "kv_cache_usage")
RATE_SIGNAL = "prefix_cache_hit_rate"
HISTOGRAM_SIGNALS = ("ttft_seconds", "e2e_seconds", "time_per_token_seconds")
GPU_SIGNALS = ("gpu_utilization", "gpu_memory_used_bytes", "gpu_memory_free_bytes")

DEFAULT_AGGREGATE: dict[str, Aggregate] = {
    "queue_depth": "sum",
    "running": "sum",
    "kv_cache_usage": "mean",
    RATE_SIGNAL: "mean",
    "gpu_utilization": "mean",
    "gpu_memory_used_bytes": "sum",
    "gpu_memory_free_bytes": "sum",
}
"""Aggregation of a signal written as a bare list of metric names."""

# Prometheus metric names (colons allowed, as vLLM and SGLang use them).
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_ENGINE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_names(names: tuple[str, ...]) -> tuple[str, ...]:
    for name in names:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"{name!r} is not a Prometheus metric name")
    return names


class _SeriesSpec(_Frozen):
    metrics: tuple[str, ...] = Field(min_length=1, description="Metric names tried in order.")
    scale: float = Field(default=1.0, description="Factor from the metric's unit to the signal's.")

    @field_validator("metrics")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_names(value)

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be a finite number > 0")
        return value


class GaugeSpec(_SeriesSpec):
    """A signal read from gauge samples."""

    aggregate: Aggregate = "sum"


class HistogramSpec(_SeriesSpec):
    """A latency signal read from a histogram's ``<name>_sum`` and ``<name>_count`` samples (scale: to
    seconds)."""


class CounterRatioSpec(_Frozen):
    """A rate read from two counters: Δhits / Δqueries between two scrapes (each: names tried in order,
    summed over their label sets)."""

    hits: tuple[str, ...] = Field(min_length=1)
    queries: tuple[str, ...] = Field(min_length=1)

    @field_validator("hits", "queries")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_names(value)


def _expand_shorthand(data: Any, fields: tuple[str, ...], histogram: tuple[str, ...] = ()) -> Any:
    """``signal: [names]`` → ``signal: {metrics: [names]}``; a gauge without ``aggregate`` gets its
    signal's default one."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for key, value in data.items():
        if key not in fields:
            continue
        if isinstance(value, list | tuple):
            value = {"metrics": value}
        is_ratio = isinstance(value, dict) and "hits" in value
        if isinstance(value, dict) and key not in histogram and "aggregate" not in value and not is_ratio:
            value = {**value, "aggregate": DEFAULT_AGGREGATE[key]}
        out[key] = value
    return out


class EngineMetrics(_Frozen):
    """The metrics of one engine kind."""

    queue_depth: GaugeSpec | None = None
    running: GaugeSpec | None = None
    kv_cache_usage: GaugeSpec | None = None
    ttft_seconds: HistogramSpec | None = None
    e2e_seconds: HistogramSpec | None = None
    time_per_token_seconds: HistogramSpec | None = None
    prefix_cache_hit_rate: GaugeSpec | CounterRatioSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _expand_shorthand(data, (*GAUGE_SIGNALS, RATE_SIGNAL, *HISTOGRAM_SIGNALS), HISTOGRAM_SIGNALS)

    def gauges(self) -> dict[str, GaugeSpec]:
        return {name: spec for name in GAUGE_SIGNALS if (spec := getattr(self, name)) is not None}

    def histograms(self) -> dict[str, HistogramSpec]:
        return {name: spec for name in HISTOGRAM_SIGNALS if (spec := getattr(self, name)) is not None}


class GpuMetrics(_Frozen):
    """GPU telemetry metrics (DCGM exporter names), read for every engine."""

    gpu_utilization: GaugeSpec | None = None
    gpu_memory_used_bytes: GaugeSpec | None = None
    gpu_memory_free_bytes: GaugeSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _expand_shorthand(data, GPU_SIGNALS)

    def gauges(self) -> dict[str, GaugeSpec]:
        return {name: spec for name in GPU_SIGNALS if (spec := getattr(self, name)) is not None}


class MetricMap(_Frozen):
    """The whole mapping: engine kind → signals, plus the GPU section."""

    version: Literal[1] = 1
    inherit_defaults: bool = Field(
        default=True, description="Operator files only: layer over the packaged mapping (true) or replace it."
    )
    engines: dict[str, EngineMetrics] = Field(default_factory=dict)
    gpu: GpuMetrics = GpuMetrics()

    @field_validator("engines")
    @classmethod
    def _engine_names(cls, value: dict[str, EngineMetrics]) -> dict[str, EngineMetrics]:
        for name in value:
            if not _ENGINE_NAME.match(name):
                raise ValueError(f"engine name {name!r} must be lower-case letters, digits, '_' or '-'")
        return value

    def engine(self, kind: str) -> EngineMetrics | None:
        return self.engines.get(kind)

    def layered_over(self, base: MetricMap) -> MetricMap:
        """This (operator) mapping over ``base``: named engines replace base's; ``gpu`` replaces when set."""
        if not self.inherit_defaults:
            return self
        engines = {**base.engines, **self.engines}
        gpu = self.gpu if "gpu" in self.model_fields_set else base.gpu
        return MetricMap(engines=engines, gpu=gpu)


def parse_metric_map(data: Any, source: str = "<metric map>") -> MetricMap:
    """Validate already-loaded YAML data; ``MetricMapError`` names each problem's path."""
    if not isinstance(data, dict):
        raise MetricMapError(source, [f"top level must be a mapping, got {type(data).__name__}"])
    try:
        return MetricMap.model_validate(data)
    except ValidationError as exc:
        raise MetricMapError(source, validation_problems(exc)) from None


def _parse_text(text: str, source: str) -> MetricMap:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MetricMapError(source, [f"not valid YAML: {exc}"]) from None
    return parse_metric_map(data, source)


def default_metric_map() -> MetricMap:
    """The packaged mapping (``control_plane/telemetry/metric_map.yaml``)."""
    resource = importlib.resources.files("control_plane.telemetry").joinpath(PACKAGED_MAP)
    return _parse_text(resource.read_text(encoding="utf-8"), f"<packaged {PACKAGED_MAP}>")


def load_metric_map(path: Path | None = None) -> MetricMap:
    """The packaged mapping, or an operator's file layered over it (see the module docstring)."""
    base = default_metric_map()
    if path is None:
        return base
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MetricMapError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    return _parse_text(text, str(path)).layered_over(base)
