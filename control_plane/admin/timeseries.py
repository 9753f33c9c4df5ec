"""A short in-memory history of per-model traffic for the status page: QPS, errors, in flight, latency.

Every `interval_s` (2 s) the sampler reads the Envoys' load reports (`LoadReportStore`: per-endpoint
issued/successful/error counters and in-flight gauges), sums them over each model's endpoint addresses in
the model's cluster, and turns the counter deltas since the previous sample into rates. The last
`window_s` (15 min) of samples are kept in a ring buffer; nothing is persisted.

Load reports carry no latency. When a Prometheus that scrapes the Envoys is configured
(`PrometheusLatency`), each sample also gets P50/P99 upstream latency per model from Envoy's
`envoy_cluster_upstream_rq_time` histogram; without one the series has no latency at all (never made up).

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

import aiohttp

from control_plane.background import BackgroundTask
from control_plane.state import GatewayState
from control_plane.xds.resources import cluster_name

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
DEFAULT_WINDOW_S = 900.0


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


class Latency(NamedTuple):
    p50_ms: float | None
    p99_ms: float | None


class LatencySource(Protocol):
    """Per-model upstream latency, e.g. from Prometheus. `describe()` is shown on the status page."""

    async def latency(self, clusters: Mapping[str, str]) -> dict[str, Latency]:
        """`clusters`: Envoy cluster name → model id. Returns model id → latency (missing: unknown)."""
        ...

    def describe(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


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


def parse_quantile_vector(body: Mapping[str, Any], clusters: Mapping[str, str]) -> dict[str, float]:
    """A Prometheus `/api/v1/query` answer (instant vector by `envoy_cluster_name`) → model id → value.

    Series of clusters that are not models, and NaN/Inf values (no requests in the range), are left out.
    Raises ValueError for an answer that is not a successful vector.
    """
    if body.get("status") != "success":
        raise ValueError(f"Prometheus answered {body.get('errorType', 'error')}: {body.get('error', '?')}")
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        raise ValueError(f"expected a vector, Prometheus answered a {data.get('resultType')!r}")
    values: dict[str, float] = {}
    for series in data.get("result") or []:
        model_id = clusters.get(str((series.get("metric") or {}).get("envoy_cluster_name", "")))
        if model_id is None:
            continue
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            values[model_id] = value
    return values


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def columns(samples: Sequence[Sample], model_order: Iterable[str], with_latency: bool) -> dict[str, Any]:
    """Samples as JSON-ready columns: `t` and, per model, one list per figure (null where unknown).

    Models are listed in `model_order` first (the registry's), then any other model seen in the window.
    """
    order = list(dict.fromkeys([*model_order, *(m for s in samples for m in s.models)]))
    figures = ["qps", "answered_qps", "error_qps", "error_ratio", "in_flight"]
    if with_latency:
        figures += ["p50_ms", "p99_ms"]
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


# Latency from Prometheus
def quantile_query(quantile: float, window: str = "1m") -> str:
    return (
        f"histogram_quantile({quantile}, sum by (envoy_cluster_name, le) "
        f'(rate(envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=~"model_.+"}}[{window}])))'
    )


class PrometheusLatency:
    """P50/P99 of Envoy's upstream request time per model cluster, from a Prometheus scraping the Envoys.

    Envoy's histogram is in milliseconds and covers the whole upstream request (a stream until its end).
    `window`: the rate range; it should span a few scrape intervals.
    """

    def __init__(
        self,
        url: str,
        *,
        window: str = "1m",
        timeout_s: float = 1.5,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.window = window
        self.timeout_s = timeout_s
        self._session = session
        self._owns_session = session is None
        self.last_error: str | None = None
        self.last_success_at: float | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "source": "prometheus",
            "url": self.url,
            "window": self.window,
            "metric": "envoy_cluster_upstream_rq_time",
            "error": self.last_error,
        }

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _query(self, query: str, clusters: Mapping[str, str]) -> dict[str, float]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self._client().get(
            f"{self.url}/api/v1/query", params={"query": query}, timeout=timeout, allow_redirects=False
        ) as response:
            if response.status != 200 and response.content_type != "application/json":
                raise ValueError(f"HTTP {response.status}")
            body = await response.json(content_type=None)
        return parse_quantile_vector(body, clusters)

    async def latency(self, clusters: Mapping[str, str]) -> dict[str, Latency]:
        try:
            p50, p99 = await asyncio.gather(
                self._query(quantile_query(0.5, self.window), clusters),
                self._query(quantile_query(0.99, self.window), clusters),
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            message = f"timed out after {self.timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            message = message or type(exc).__name__
            if self.last_error is None:
                log.warning("status page: latency from Prometheus %s unavailable: %s", self.url, message)
            self.last_error = message
            return {}
        if self.last_error is not None:
            log.info("status page: latency from Prometheus %s available again", self.url)
        self.last_error = None
        self.last_success_at = time.time()
        return {
            model_id: Latency(p50_ms=p50.get(model_id), p99_ms=p99.get(model_id)) for model_id in {*p50, *p99}
        }


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
        previous = self._previous
        dt = now - previous[0] if previous else 0.0
        points = {}
        for model_id, current in counts.items():
            point = rates(previous[1].get(model_id) if previous else None, current, dt)
            measured = (latency or {}).get(model_id)
            if measured is not None:
                point = dataclasses.replace(point, p50_ms=measured.p50_ms, p99_ms=measured.p99_ms)
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
            **columns(samples, order, with_latency=self.latency_source is not None),
        }
