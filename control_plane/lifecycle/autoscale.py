"""Autoscaling launched models: a model's load signals over time → how many replicas it should have.

The contract (`ScalingPolicy`): the manager calls `desired(model_id, signals, settings)` about once a second
for every loaded model whose `max_replicas` is above 1, with the signals read just before (`signals.at`, a
monotonic time: the policy keeps its own clock from them, so tests inject time). It returns the replica
count the model should have, within `[max(min_replicas, 1), max_replicas]`; the manager then starts or
drains replicas (within the memory budget) to reach it. A policy may keep state per model (how long a
signal has stayed high); `forget(model_id)` drops it when the model unloads. Scaling to zero is not a
policy's job: idle unloading (`idle_unload_s`) does that.

`QueueDepthPolicy` (the default) steps one replica at a time:
- up, when some target is exceeded (queue depth per ready replica, mean TTFT, requests in flight per ready
  replica, mean GPU utilisation) for `scale_up_after_s` without a break, and no replica is still loading
  (its capacity is not there yet: counting from its readiness avoids overshooting);
- down, when for `scale_down_cooldown_s` every known signal fits one replica fewer (queue depth and in
  flight within their targets times (n - 1); TTFT and GPU utilisation within their targets times
  (n - 1) / n, taking them as proportional to the load per replica), and as long since the last step.

The same policy sizes models with fixed endpoints (lifecycle/external.py): `settings` is then the model's
`scaling` section, which has the same `min_replicas`, `max_replicas` and `autoscale`.

`ReplicaSignalReader` reads a model's signals: each ready replica's /metrics through the telemetry
package's scraper (the metric names per engine are data there: telemetry/metric_map.yaml; GPU utilisation
is DCGM_FI_DEV_GPU_UTIL from the engine's own /metrics or the endpoint's DCGM exporter, else NVML on the
GPUs a launched replica was given), and Envoy's requests in flight per replica (its load reports) plus the
activator's held requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from control_plane.config.lifecycle import AutoscaleSettings
from control_plane.telemetry.errors import TelemetryError
from control_plane.telemetry.gpu_nvml import read_nvml_gpu_signals
from control_plane.telemetry.scraper import ScrapeTarget, TelemetryScraper, metrics_url
from control_plane.telemetry.signals import EndpointSignals, GpuSignals


@dataclass(frozen=True)
class ScalingSignals:
    """One reading of a model's load, over its replicas."""

    at: float  # monotonic seconds
    ready: int  # replicas serving
    loading: int = 0  # replicas starting
    queue_depth: float | None = None  # requests waiting, summed over the ready replicas (None: unknown)
    ttft_s: float | None = None  # mean time to first token of recent requests (None: none finished)
    in_flight: float = 0.0  # requests in flight on the model (Envoy's and the activator's)
    gpu_utilization: float | None = None  # 0..1, mean over the ready replicas' GPUs (None: unknown)

    @property
    def replicas(self) -> int:
        return self.ready + self.loading


class Scaled(Protocol):
    """What a policy reads of a model's settings: a launched model's `launch`, or the `scaling` of a model
    with fixed endpoints (config/lifecycle.py)."""

    @property
    def min_replicas(self) -> int: ...

    @property
    def max_replicas(self) -> int: ...

    @property
    def autoscale(self) -> AutoscaleSettings: ...


class ScalingPolicy(Protocol):
    def desired(self, model_id: str, signals: ScalingSignals, launch: Scaled) -> int:
        """The replica count the model should have now, within [max(min_replicas, 1), max_replicas]."""

    def forget(self, model_id: str) -> None:
        """The model unloaded: drop what was kept about it."""


def bounds(launch: Scaled) -> tuple[int, int]:
    """The replica counts autoscaling moves a loaded model between."""
    low = max(launch.min_replicas, 1)
    return low, max(low, launch.max_replicas)


@dataclass
class _Trend:
    above_since: float | None = None
    below_since: float | None = None
    changed_at: float | None = None


class QueueDepthPolicy:
    """One replica up after a sustained overload, one down after a cooldown of low load (module docstring)."""

    def __init__(self) -> None:
        self._trends: dict[str, _Trend] = {}

    def forget(self, model_id: str) -> None:
        self._trends.pop(model_id, None)

    def desired(self, model_id: str, signals: ScalingSignals, launch: Scaled) -> int:
        low, high = bounds(launch)
        current = max(signals.replicas, 1)
        clamped = min(max(current, low), high)
        if clamped != current:
            return clamped  # bounds changed (or a replica was lost): go there first
        trend = self._trends.setdefault(model_id, _Trend())
        now, targets = signals.at, launch.autoscale
        if _above(signals, targets):
            trend.below_since = None
            if signals.loading or trend.above_since is None:
                trend.above_since = now  # a replica still loading: its capacity is not there yet
            elif now - trend.above_since >= targets.scale_up_after_s and current < high:
                trend.above_since, trend.changed_at = now, now
                return current + 1
        elif current > low and _fits_fewer(signals, targets):
            trend.above_since = None
            if trend.below_since is None:
                trend.below_since = now
            quiet = now - trend.below_since >= targets.scale_down_cooldown_s
            settled = trend.changed_at is None or now - trend.changed_at >= targets.scale_down_cooldown_s
            if quiet and settled and not signals.loading:
                trend.below_since, trend.changed_at = now, now
                return current - 1
        else:
            trend.above_since = trend.below_since = None
        return current


def _above(signals: ScalingSignals, targets: AutoscaleSettings) -> bool:
    ready = max(signals.ready, 1)
    return (
        (targets.target_queue_depth is not None and signals.queue_depth is not None
         and signals.queue_depth / ready > targets.target_queue_depth)
        or (targets.target_ttft_s is not None and signals.ttft_s is not None
            and signals.ttft_s > targets.target_ttft_s)
        or (targets.target_in_flight is not None and signals.in_flight / ready > targets.target_in_flight)
        or (targets.target_gpu_utilization is not None and signals.gpu_utilization is not None
            and signals.gpu_utilization > targets.target_gpu_utilization)
    )  # fmt: skip


def _fits_fewer(signals: ScalingSignals, targets: AutoscaleSettings) -> bool:
    """Whether every known signal would stay within its target with one replica fewer (and one is known)."""
    fewer = signals.ready - 1
    if fewer < 1:
        return False
    checks: list[bool] = []
    if targets.target_queue_depth is not None and signals.queue_depth is not None:
        checks.append(signals.queue_depth <= targets.target_queue_depth * fewer)
    if targets.target_ttft_s is not None and signals.ttft_s is not None:
        checks.append(signals.ttft_s <= targets.target_ttft_s * fewer / signals.ready)
    if targets.target_in_flight is not None:
        checks.append(signals.in_flight <= targets.target_in_flight * fewer)
    if targets.target_gpu_utilization is not None and signals.gpu_utilization is not None:
        # The same work on one replica fewer: utilisation grows by n / (n - 1).
        checks.append(signals.gpu_utilization <= targets.target_gpu_utilization * fewer / signals.ready)
    return bool(checks) and all(checks)


class ReplicaSignalReader:
    """Reads a launched model's signals from its ready replicas (module docstring). Holds each replica's
    previous scrape, for mean latencies between two readings; its scraper's session is closed by `close()`."""

    def __init__(
        self,
        scraper: TelemetryScraper,
        in_flight: Callable[[str], int],
        clock: Callable[[], float],
    ) -> None:
        self._scraper = scraper
        self._in_flight = in_flight
        self._clock = clock
        self._previous: dict[str, EndpointSignals] = {}

    async def read(
        self, engine: str, addresses: Sequence[str], loading: int, held: int, gpus: Sequence[int] = ()
    ) -> ScalingSignals:
        """`addresses`: the ready replicas (host:port); `held`: the activator's requests for the model;
        `gpus`: the local GPUs its replicas were given (NVML, when their /metrics has no GPU utilisation)."""
        targets = [ScrapeTarget(a, metrics_url(f"http://{a}"), engine) for a in addresses]
        return await self.read_targets(targets, addresses, loading=loading, held=held, gpus=gpus)

    async def read_targets(
        self,
        targets: Sequence[ScrapeTarget],
        addresses: Sequence[str],
        *,
        loading: int = 0,
        held: int = 0,
        gpus: Sequence[int] = (),
    ) -> ScalingSignals:
        """The signals of any endpoints: `targets` to scrape (a DCGM exporter of their own included),
        `addresses` (ip:port) whose requests in flight Envoy reports."""
        scraped = await asyncio.gather(*(self._scrape(t) for t in targets))
        known = [s for s in scraped if s is not None]
        queues = [s.queue_depth for s in known if s.queue_depth is not None]
        ttfts = [s.ttft_seconds_mean for s in known if s.ttft_seconds_mean is not None]
        utils = [s.gpu_utilization for s in known if s.gpu_utilization is not None]
        if not utils and gpus:
            local: GpuSignals | None = await asyncio.to_thread(read_nvml_gpu_signals, list(gpus))
            utils = [local.utilization] if local is not None and local.utilization is not None else []
        in_flight = sum(self._in_flight(a) for a in addresses) + held
        return ScalingSignals(
            at=self._clock(),
            ready=len(targets),
            loading=loading,
            queue_depth=sum(queues) if queues else None,
            ttft_s=sum(ttfts) / len(ttfts) if ttfts else None,
            in_flight=float(in_flight),
            gpu_utilization=sum(utils) / len(utils) if utils else None,
        )

    async def _scrape(self, target: ScrapeTarget) -> EndpointSignals | None:
        key = target.metrics_url
        try:
            signals = await self._scraper.scrape_target(target, previous=self._previous.get(key))
        except TelemetryError:
            return None  # an endpoint that does not answer /metrics adds no evidence either way
        self._previous[key] = signals
        return signals

    def forget(self, addresses: Sequence[str]) -> None:
        for address in addresses:
            self._previous.pop(metrics_url(f"http://{address}"), None)

    async def close(self) -> None:
        await self._scraper.close()
