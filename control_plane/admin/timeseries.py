"""A short in-memory history of per-model traffic for the status page: QPS, errors, in flight, latency.

Every `interval_s` (2 s) the sampler reads the Envoys' load reports (`LoadReportStore`: per-endpoint
issued/successful/error counters and in-flight gauges), sums them over each model's endpoint addresses in
the model's cluster, and turns the counter deltas since the previous sample into rates. The last
`window_s` (15 min) of samples are kept in a ring buffer; nothing is persisted.

Load reports carry no latency. When a Prometheus that scrapes the Envoys is configured
(`PrometheusLatency`), each sample also gets P50/P99 upstream latency per model from Envoy's
`envoy_cluster_upstream_rq_time` histogram; without one the series has no latency at all (never made up).

Time to first token and tokens per second come from the engines' own metrics, as the telemetry scraper
last read them (`EngineSignals`: TTFT and time-per-output-token means of the requests finished between
two scrapes), averaged over the model's endpoints with fresh figures. Tokens per second is the decode
speed of one stream (1 / time per output token). An engine that does not export a figure (TGI has no
TTFT histogram, TEI generates no tokens) leaves it unknown.

Only the models of the current registry are charted: a removed model leaves the charts at once.

The arithmetic (`model_targets`, `read_counts`, `rates`, `parse_quantile_vector`, `columns`) is pure and
tested on its own; `TimeSeriesSampler.run()` is the loop, started and stopped by its owner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from control_plane.admin.latency import Latency, LatencySource
from control_plane.background import BackgroundTask
from control_plane.state import GatewayState
from control_plane.xds.resources import cluster_name

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
DEFAULT_WINDOW_S = 900.0
LOCAL_REPLIES = "(envoy)"  # the pseudo-address of the errors Envoy answers itself


class LoadCounters(Protocol):
    """What the sampler reads from the LRS store (`control_plane.xds.lrs.LoadReportStore`)."""

    def issued_total(self, address: str, cluster: str | None = None) -> int: ...

    def successful_total(self, address: str, cluster: str | None = None) -> int: ...

    def error_total(self, address: str, cluster: str | None = None) -> int: ...

    def in_flight(self, address: str, cluster: str | None = None) -> int: ...


class StateSource(Protocol):
    """The control plane, as far as the sampler needs it: its current state (models and addresses)."""

    @property
    def state(self) -> GatewayState: ...


class EngineSignals(Protocol):
    """The telemetry collector (`control_plane.telemetry.scraper.TelemetryCollector`): the latest
    `EndpointSignals` per endpoint id."""

    def latest(self) -> Mapping[str, Any]: ...


class Counts(NamedTuple):
    """Counters of one endpoint in one cluster, summed over every Envoy: totals since the start."""

    issued: int = 0
    successful: int = 0
    errors: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class Target:
    """Where a model's figures are: its Envoy cluster and its endpoints' `ip:port` addresses."""

    cluster: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class ModelPoint:
    qps: float | None = None  # requests issued to the model's endpoints per second
    answered_qps: float | None = None  # requests answered (response headers arrived or failed) per second
    error_qps: float | None = None  # requests answered with an error (5xx, reset) per second
    error_ratio: float | None = None  # errors / answered requests in the interval; None when none answered
    in_flight: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    ttft_ms: float | None = None  # mean time to first token (engines' metrics)
    tokens_per_s: float | None = None  # decode speed of one stream: 1 / mean time per output token


class EngineFigures(NamedTuple):
    ttft_ms: float | None
    tokens_per_s: float | None


@dataclass(frozen=True)
class Sample:
    t: float  # wall-clock time (unix seconds)
    models: dict[str, ModelPoint] = field(default_factory=dict)


# Pure arithmetic
def model_targets(state: GatewayState) -> dict[str, Target]:
    """Model id → its cluster and endpoint addresses, in the state's order."""
    return {
        model.id: Target(
            cluster=cluster_name(model.id),
            addresses=tuple(dict.fromkeys(f"{e.address}:{e.port}" for e in model.endpoints)),
        )
        for model in state.models
    }


def read_counts(loads: LoadCounters, targets: Mapping[str, Target]) -> dict[str, dict[str, Counts]]:
    """Model id → address → the endpoint's counters in the model's cluster now."""
    return {
        model_id: {
            address: Counts(
                issued=loads.issued_total(address, target.cluster),
                successful=loads.successful_total(address, target.cluster),
                errors=loads.error_total(address, target.cluster),
                in_flight=loads.in_flight(address, target.cluster),
            )
            for address in target.addresses
        }
        for model_id, target in targets.items()
    }


def rates(previous: Mapping[str, Counts] | None, current: Mapping[str, Counts], dt_s: float) -> ModelPoint:
    """One model's rates between two readings `dt_s` seconds apart.

    Only endpoints present in both readings count (a new endpoint's first reading is its baseline), and a
    counter that went down (an Envoy forgotten by the store) counts as no change rather than a negative
    rate. Without a previous reading (first sample, new model) there are no rates, only in flight.
    """
    in_flight = sum(c.in_flight for c in current.values())
    if previous is None or dt_s <= 0:
        return ModelPoint(in_flight=in_flight)
    issued = successful = errors = 0
    for address, now in current.items():
        before = previous.get(address)
        if before is None:
            continue
        issued += max(0, now.issued - before.issued)
        successful += max(0, now.successful - before.successful)
        errors += max(0, now.errors - before.errors)
    answered = successful + errors
    return ModelPoint(
        qps=issued / dt_s,
        answered_qps=answered / dt_s,
        error_qps=errors / dt_s,
        error_ratio=errors / answered if answered else None,
        in_flight=in_flight,
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def engine_figures(
    state: GatewayState, latest: Mapping[str, Any], now: float, max_age_s: float
) -> dict[str, EngineFigures]:
    """Model id → mean TTFT (ms) and tokens per second of its endpoints' signals at most `max_age_s`
    old at `now` (the signals' monotonic clock). Endpoints without a figure do not count; a model
    none of whose endpoints has one gets None."""
    figures: dict[str, EngineFigures] = {}
    for model in state.models:
        ttft: list[float] = []
        per_token: list[float] = []
        for endpoint in model.endpoints:
            signals = latest.get(endpoint.id)
            scraped_at = getattr(signals, "scraped_at", None)
            if signals is None or scraped_at is None or now - scraped_at > max_age_s:
                continue
            value = getattr(signals, "ttft_seconds_mean", None)
            if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
                ttft.append(value)
            value = getattr(signals, "time_per_token_seconds_mean", None)
            if isinstance(value, int | float) and math.isfinite(value) and value > 0:
                per_token.append(value)
        mean_ttft, mean_per_token = _mean(ttft), _mean(per_token)
        figures[model.id] = EngineFigures(
            ttft_ms=None if mean_ttft is None else mean_ttft * 1000,
            tokens_per_s=None if mean_per_token is None else 1 / mean_per_token,
        )
    return figures


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def columns(
    samples: Sequence[Sample], model_order: Iterable[str], with_latency: bool, with_engine: bool = False
) -> dict[str, Any]:
    """Samples as JSON-ready columns: `t` and, per model, one list per figure (null where unknown).

    Only the models of `model_order` (the registry's, in its order) are listed: a removed model's
    history is left out, so it leaves the charts.
    """
    order = list(dict.fromkeys(model_order))
    figures = ["qps", "answered_qps", "error_qps", "error_ratio", "in_flight"]
    if with_latency:
        figures += ["p50_ms", "p99_ms"]
    if with_engine:
        figures += ["ttft_ms", "tokens_per_s"]
    models: dict[str, dict[str, list[float | int | None]]] = {}
    for model_id in order:
        points = [s.models.get(model_id) for s in samples]
        if all(p is None for p in points):
            continue
        models[model_id] = {
            name: [None if p is None else _value(p, name) for p in points] for name in figures
        }
    return {"t": [round(s.t, 3) for s in samples], "models": models}


def _value(point: ModelPoint, name: str) -> float | int | None:
    value: float | int | None = getattr(point, name)
    if isinstance(value, float):
        return _round(value, 4 if name == "error_ratio" else 3)
    return value


class TimeSeriesSampler:
    """Samples per-model traffic every `interval_s` into a ring buffer of `window_s`.

    `start()` runs the loop as a task of the running event loop, `stop()` cancels it (and closes the
    latency source). `sample_once()` takes one sample synchronously (tests, or a caller's own loop).
    """

    def __init__(
        self,
        plane: StateSource,
        loads: LoadCounters,
        *,
        latency: LatencySource | None = None,
        engine: EngineSignals | None = None,
        engine_max_age_s: float = 10.0,
        local_errors: Callable[[], Mapping[str, int]] | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError("interval_s must be positive and window_s at least interval_s")
        self.plane = plane
        self.loads = loads
        self.latency_source = latency
        self.engine_source = engine
        self.engine_max_age_s = engine_max_age_s
        # Model id → 5xx replies Envoy made itself without reaching an endpoint, since start
        # (control_plane/xds/als.py): no load report has them.
        self.local_errors = local_errors
        self.interval_s = interval_s
        self.window_s = window_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._samples: deque[Sample] = deque(maxlen=math.ceil(window_s / interval_s))
        self._previous: tuple[float, dict[str, dict[str, Counts]]] | None = None
        self._background = BackgroundTask("status-timeseries", self.run)

    @property
    def samples(self) -> list[Sample]:
        return list(self._samples)

    def _targets(self) -> dict[str, Target]:
        return model_targets(self.plane.state)

    def sample_once(self, latency: Mapping[str, Latency] | None = None) -> Sample:
        """Read the counters now, append a sample (rates against the previous reading), return it."""
        targets = self._targets()
        now = self._clock()
        counts = read_counts(self.loads, targets)
        if self.local_errors is not None:
            # Envoy's own 5xx (draining, disabled, no healthy endpoint) as one more "address" of each model:
            # answered errors, never issued to an endpoint, so they raise error_qps and error_ratio only.
            unreported = self.local_errors()
            for model_id, per_address in counts.items():
                per_address[LOCAL_REPLIES] = Counts(errors=unreported.get(model_id, 0))
        previous = self._previous
        dt = now - previous[0] if previous else 0.0
        engine = (
            engine_figures(self.plane.state, self.engine_source.latest(), now, self.engine_max_age_s)
            if self.engine_source is not None
            else {}
        )
        points = {}
        for model_id, current in counts.items():
            point = rates(previous[1].get(model_id) if previous else None, current, dt)
            measured = (latency or {}).get(model_id)
            if measured is not None:
                point = dataclasses.replace(point, p50_ms=measured.p50_ms, p99_ms=measured.p99_ms)
            figures = engine.get(model_id)
            if figures is not None:
                point = dataclasses.replace(point, ttft_ms=figures.ttft_ms, tokens_per_s=figures.tokens_per_s)
            points[model_id] = point
        self._previous = (now, counts)
        sample = Sample(t=self._wall_clock(), models=points)
        self._samples.append(sample)
        return sample

    async def tick(self) -> Sample:
        """One sample, with latency from the source when there is one (its failure leaves latency out)."""
        measured: dict[str, Latency] | None = None
        if self.latency_source is not None:
            clusters = {target.cluster: model_id for model_id, target in self._targets().items()}
            measured = await self.latency_source.latency(clusters)
        # The rates' interval is measured between counter readings, whatever Prometheus took.
        return self.sample_once(measured)

    async def run(self) -> None:
        """Sample every `interval_s` until cancelled; a slow tick shortens the next pause, not the rate."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("status page: sampling failed")
            next_at += self.interval_s
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a stalled loop): start again from now rather than catch up
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    def start(self) -> asyncio.Task[None]:
        return self._background.start()

    async def stop(self) -> None:
        await self._background.stop()
        if self.latency_source is not None:
            await self.latency_source.close()

    def to_json(self, window_s: float | None = None) -> dict[str, Any]:
        """The window (or its last `window_s`) as columns, with what the page needs to draw it."""
        samples = list(self._samples)
        if window_s is not None and samples:
            since = samples[-1].t - window_s
            samples = [s for s in samples if s.t >= since]
        order = [m.id for m in self.plane.state.models]
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "now": round(self._wall_clock(), 3),
            "latency": self.latency_source.describe() if self.latency_source is not None else None,
            "engine": {"source": "telemetry", "max_age_s": self.engine_max_age_s}
            if self.engine_source is not None
            else None,
            **columns(
                samples,
                order,
                with_latency=self.latency_source is not None,
                with_engine=self.engine_source is not None,
            ),
        }
