"""How many replicas a launched model runs, between its minimum and its maximum (the manager owns a `Scaler`
and calls `step` for every model once a tick, lifecycle/manager.py).

- `min_replicas` are loaded at start (without a request) and kept: a model behaves as pinned for that many
  (never evicted, idle-unloaded or scaled below it) until an admin unload, which suspends the minimum until
  the model's next load (`ModelRuntime.floor`). One whose load failed is tried again `FLOOR_RETRY_S` later.
- Above it, up to `max_replicas`, a `ScalingPolicy` (lifecycle/autoscale.py) reading the replicas' /metrics
  and Envoy's in flight sets the desired count once a tick; the scaler adds one replica at a time (a
  scale-up makes room only from idle, unpinned models: lifecycle/placement.py) or drains and stops one
  (never the last ready one). One change per model at a time (`ModelRuntime.scaling`), a replacement
  (lifecycle/supervision.py) included.
- The desired and per-state replica counts are exported as gauges after each tick.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from control_plane.lifecycle.autoscale import ReplicaSignalReader, ScalingPolicy, bounds
from control_plane.lifecycle.errors import DoesNotFit
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.lifecycle.placement import Placement
from control_plane.lifecycle.replicas import STOP_GRACE_S, ModelRuntime, Replica
from control_plane.lifecycle.types import LifecycleState

log = logging.getLogger(__name__)

FLOOR_RETRY_S = 30.0  # a model with min_replicas whose load failed is tried again this long after
REPLICA_STATES = (
    LifecycleState.LOADING,
    LifecycleState.READY,
    LifecycleState.DRAINING,
    LifecycleState.UNLOADING,
)

ReplicaAction = Callable[[ModelRuntime, Replica], None]
Drain = Callable[[ModelRuntime, list[Replica]], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None]], object]
Event = Callable[[str, str, str], None]


class Scaler:
    def __init__(
        self,
        runtimes: Mapping[str, ModelRuntime],
        *,
        placement: Placement,
        policy: ScalingPolicy,
        signals: ReplicaSignalReader,
        metrics: LifecycleMetrics,
        in_flight: Callable[[str], int],
        clock: Callable[[], float],
        load: Callable[[ModelRuntime], object],
        new_replica: Callable[[ModelRuntime], Replica],
        run_replica: Callable[[ModelRuntime, Replica], Awaitable[None]],
        publish_ready: Callable[[ModelRuntime], None],
        unlist: ReplicaAction,
        drain: Drain,
        spawn: Spawn,
        event: Event,
    ) -> None:
        """The manager's pieces: `load` starts a model's first load (once however often called);
        `new_replica` lists one more replica (under the placement lock), `run_replica` starts it and waits
        for its readiness (unlisting it on failure), `publish_ready` pushes the ready ones to Envoy, `unlist`
        forgets a stopped one, `drain` waits until nothing is in flight on some; `spawn` runs a task the
        manager cancels on close, `event` records (model, event, detail) for the admin API."""
        self._runtimes = runtimes
        self._placement = placement
        self._policy = policy
        self._signals = signals
        self._metrics = metrics
        self._in_flight = in_flight
        self._clock = clock
        self._load = load
        self._new_replica = new_replica
        self._run_replica = run_replica
        self._publish_ready = publish_ready
        self._unlist = unlist
        self._drain = drain
        self._spawn = spawn
        self._event = event

    async def step(self, runtime: ModelRuntime) -> None:
        """The tick's pass over one model (not being idle-unloaded): its desired count, then one change
        toward it."""
        if runtime.fixed is not None:  # the admin API's count, loading the model if it is cold
            runtime.desired = runtime.fixed
            if runtime.state in (LifecycleState.COLD, LifecycleState.FAILED):
                self._load(runtime)
        elif runtime.state is LifecycleState.READY:
            await self._autoscale(runtime)
        else:
            loading = runtime.state is LifecycleState.LOADING
            runtime.desired = max(runtime.floor, 1 if loading else 0)
        self._reconcile(runtime)

    def unloaded(self, model_id: str) -> None:
        """The model is cold: the policy's state for it (how long a signal stayed high) starts over."""
        self._policy.forget(model_id)

    def removed(self, model_id: str) -> None:
        """The model left the registry: its gauges go."""
        with contextlib.suppress(KeyError):  # never exported if no tick ran
            self._metrics.desired_replicas.remove(model_id)
            for state in REPLICA_STATES:
                self._metrics.replicas.remove(model_id, state.value)

    def export(self) -> None:
        for model_id, runtime in self._runtimes.items():
            self._metrics.desired_replicas.labels(model_id).set(runtime.desired)
            for state in REPLICA_STATES:
                self._metrics.replicas.labels(model_id, state.value).set(len(runtime.in_state(state)))

    async def _autoscale(self, runtime: ModelRuntime) -> None:
        low, high = bounds(runtime.launch)
        if high <= 1:
            runtime.desired = low
            return
        ready = runtime.ready
        signals = await self._signals.read(
            str(runtime.model.engine),
            [r.address for r in ready],
            loading=len(runtime.in_state(LifecycleState.LOADING)),
            held=runtime.held,
            gpus=runtime.launch.gpus,
        )
        desired = self._policy.desired(runtime.model.id, signals, runtime.launch)
        if desired != runtime.desired:
            self._event(runtime.model.id, "desired replicas", f"{runtime.desired} → {desired}")
        runtime.desired = desired

    def _reconcile(self, runtime: ModelRuntime) -> None:
        """Start or stop one replica toward the model's target (its minimum, or the policy's count)."""
        if runtime.state in (LifecycleState.COLD, LifecycleState.FAILED) and runtime.floor:
            failed_at = runtime.failed_at if runtime.state is LifecycleState.FAILED else None
            if failed_at is None or self._clock() - failed_at >= FLOOR_RETRY_S:
                self._load(runtime)
            return
        if runtime.state is not LifecycleState.READY or runtime.scaling:
            return
        target = min(max(runtime.desired, runtime.floor, 1), bounds(runtime.launch)[1])
        if len(runtime.active) < target:
            runtime.changes += 1
            self._spawn(self._add_replica(runtime, target))
        elif len(runtime.active) > target and len(runtime.ready) > 1:
            runtime.changes += 1
            self._spawn(self._scale_down(runtime, f"scaled down to {target}"))

    async def _add_replica(self, runtime: ModelRuntime, target: int) -> None:
        model_id = runtime.model.id
        try:
            async with self._placement.lock:
                if runtime.state is not LifecycleState.READY:
                    return
                try:
                    await self._placement.make_room(runtime, busy_ok=False)
                except DoesNotFit as exc:
                    if runtime.blocked != str(exc):  # reported once, not every tick
                        runtime.blocked = str(exc)
                        self._event(model_id, "scale-up blocked", str(exc))
                    return
                runtime.blocked = None
                replica = self._new_replica(runtime)
            self._event(model_id, "replica loading", f"{len(runtime.active)} of {target}")
            await self._run_replica(runtime, replica)
            if replica.state is LifecycleState.READY:
                self._publish_ready(runtime)
                self._event(model_id, "replica ready", f"{replica.address}; {len(runtime.ready)} ready")
        except Exception as exc:  # a failed extra replica leaves the model serving: reported, not raised
            log.exception("adding a replica of %s failed", model_id)
            self._event(model_id, "replica failed", str(exc)[:500])
        finally:
            runtime.changes -= 1

    async def _scale_down(self, runtime: ModelRuntime, reason: str) -> None:
        try:
            await self.remove_replica(runtime, reason)
        finally:
            runtime.changes -= 1

    async def remove_replica(self, runtime: ModelRuntime, reason: str) -> None:
        """Drain the least busy ready replica (taken from Envoy first), then stop it; never the last. Also
        an eviction's way to take one replica above a model's minimum."""
        ready = runtime.ready
        if len(ready) <= 1:
            return
        replica = min(reversed(ready), key=lambda r: self._in_flight(r.address))
        replica.state = LifecycleState.DRAINING
        self._publish_ready(runtime)
        self._event(runtime.model.id, "replica draining", f"{replica.address}: {reason}")
        await self._drain(runtime, [replica])
        replica.state = LifecycleState.UNLOADING
        await replica.engine.stop(STOP_GRACE_S)
        self._unlist(runtime, replica)
        self._event(runtime.model.id, "replica stopped", f"{replica.address}; {len(runtime.ready)} ready")
