"""Launched models through their states (cold → loading → ready → draining → unloading → cold, or failed),
with one or more replicas each, under a memory budget, one load per model however many requests want it
(docs/lifecycle.md).

Contract with the rest of the control plane:
- `publish(model_id, replicas)` is told every change of a model's ready replicas; the control plane pushes
  them as the model's endpoints (EDS), and Envoy balances over them. With none ready, Envoy sends the
  model's requests to the activator.
- `acquire(model_id)` (the activator, for a request Envoy sent it) loads the model if needed and waits for
  a ready replica, at most the model's activation timeout, and names the least loaded one (Envoy's
  requests in flight, round robin among equals); `release` when that request is done.
- `in_flight(address)` and `issued(address)` read Envoy's load reports (LRS) for a replica: a replica is
  stopped only once no request is in flight on it, and a replica serving traffic is not idle.
- Replicas: each holds the model's `memory_mb` of the budget; a load that does not fit evicts others
  (lifecycle/placement.py). Between `min_replicas` (loaded at start, kept until an admin unload) and
  `max_replicas`, the manager's `Scaler` (lifecycle/scaling.py) adds or drains one replica at a time.
- Replicas are started, watched and replaced when they exit or fail their health probes by the manager's
  `Supervisor` (lifecycle/supervision.py); `set_health` gives it the prober's verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from control_plane.config.schema import Registry
from control_plane.lifecycle.autoscale import QueueDepthPolicy, ReplicaSignalReader, ScalingPolicy
from control_plane.lifecycle.errors import LifecycleError, LoadFailed, LoadingTimeout
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.lifecycle.placement import Placement
from control_plane.lifecycle.replicas import STOP_GRACE_S, Engine, ModelRuntime, Replica
from control_plane.lifecycle.scaling import Scaler
from control_plane.lifecycle.supervision import EngineFactory, Publish, Supervisor
from control_plane.lifecycle.types import LifecycleState
from control_plane.telemetry.scraper import TelemetryScraper

__all__ = ["Engine", "LifecycleError", "LifecycleManager"]

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 600.0


class LifecycleManager:
    def __init__(
        self,
        publish: Publish,
        engines: EngineFactory,
        *,
        metrics: LifecycleMetrics,
        in_flight: Callable[[str], int] = lambda address: 0,
        issued: Callable[[str], int] = lambda address: 0,
        free_port: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        log_dir: Path | None = None,
        report_interval_s: float = 1.0,
        policy: ScalingPolicy | None = None,
        signals: ReplicaSignalReader | None = None,
    ) -> None:
        self._publish = publish
        self._metrics = metrics
        self._in_flight = in_flight
        self._issued = issued
        self._clock = clock
        self._log_dir = log_dir
        # The replicas' own /metrics (launched replicas are not in the registry's scrape targets).
        self._signals = signals or ReplicaSignalReader(TelemetryScraper(timeout_s=1.0), in_flight, clock)
        # Envoys report their requests in flight (LRS) this often: a drain trusts "none in flight" only
        # from reports made after it began, so a request that started just before is never cut.
        self._settle_s = 2 * report_interval_s + 0.5
        self._runtimes: dict[str, ModelRuntime] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=500)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._placement = Placement(
            self._runtimes,
            metrics=metrics,
            in_flight=in_flight,
            shed_replica=lambda runtime, reason: self._scaler.remove_replica(runtime, reason),
            unload=self._unload,
        )
        self._supervisor = Supervisor(
            self._runtimes,
            engines=engines,
            publish=lambda: self._publish,
            placement=self._placement,
            signals=self._signals,
            metrics=metrics,
            free_port=free_port,
            clock=clock,
            drain=self._drain,
            give_up=self._give_up,
            failed=self._failed,
            spawn=self._spawn,
            event=self._event,
        )
        self._scaler = Scaler(
            self._runtimes,
            placement=self._placement,
            policy=policy or QueueDepthPolicy(),
            signals=self._signals,
            metrics=metrics,
            in_flight=in_flight,
            clock=clock,
            load=self._ensure_loading,
            new_replica=self._supervisor.new_replica,
            run_replica=self._supervisor.run_replica,
            publish_ready=self._supervisor.publish_ready,
            unlist=self._supervisor.unlist,
            drain=self._drain,
            spawn=self._spawn,
            event=self._event,
        )

    def set_publisher(self, publish: Publish) -> None:
        self._publish = publish

    def set_health(self, unhealthy: Callable[[str], bool]) -> None:
        """`unhealthy(replica_id)`: whether the health prober marks a published replica unhealthy."""
        self._supervisor.set_health(unhealthy)

    # Following the registry
    async def follow(self, registry: Registry) -> None:
        """A registry listener: launched models appear cold, removed ones are unloaded."""
        self._placement.budget_mb = registry.lifecycle.gpu_memory_mb
        launched = {m.id: m for m in registry.models if m.launch is not None}
        for model_id, model in launched.items():
            runtime = self._runtimes.get(model_id)
            if runtime is None:
                self._runtimes[model_id] = ModelRuntime(model=model)
                self._event(model_id, "discovered", f"{model.launch.launcher if model.launch else ''}")
            else:
                runtime.model = model
        for model_id in [m for m in self._runtimes if m not in launched]:
            self._spawn(self._forget(model_id))

    async def _forget(self, model_id: str) -> None:
        await self.unload(model_id, "removed from the registry")
        self._runtimes.pop(model_id, None)
        self._scaler.removed(model_id)

    # The activator's side
    def knows(self, model_id: str) -> bool:
        return model_id in self._runtimes

    async def acquire(self, model_id: str) -> tuple[str, int]:
        """A ready replica's (host, port), loading the model first if needed."""
        runtime = self._runtimes[model_id]
        runtime.held += 1
        runtime.last_used = self._clock()
        self._metrics.held.inc()
        started = self._clock()
        try:
            if not runtime.ready:
                attempt = self._ensure_loading(runtime)
                timeout = runtime.launch.activation_timeout_s
                try:
                    await asyncio.wait_for(asyncio.shield(attempt), timeout)
                except TimeoutError:
                    raise LoadingTimeout(
                        f"The model `{model_id}` is still loading after {timeout:g} s. Retry shortly."
                    ) from None
            ready = self._supervisor.serving(runtime)
            if not ready:
                raise LoadFailed(f"The model `{model_id}` has no ready replica.")
            runtime.turn = (runtime.turn + 1) % len(ready)
            rotated = ready[runtime.turn :] + ready[: runtime.turn]
            replica = min(rotated, key=lambda r: self._in_flight(r.address))  # first of the least loaded
            self._metrics.activation_wait.observe(self._clock() - started)
            return "127.0.0.1", replica.port
        except BaseException:
            self.release(model_id)
            raise

    def release(self, model_id: str) -> None:
        runtime = self._runtimes.get(model_id)
        if runtime is not None and runtime.held:
            runtime.held -= 1
            runtime.last_used = self._clock()
            self._metrics.held.dec()

    # Loading
    def _ensure_loading(self, runtime: ModelRuntime) -> asyncio.Future[None]:
        if runtime.attempt is None or runtime.attempt.done():
            runtime.attempt = asyncio.get_running_loop().create_future()
            runtime.attempt.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            runtime.task = self._spawn(self._load(runtime, runtime.attempt))
        return runtime.attempt

    async def load(self, model_id: str) -> None:
        """The admin API's load: start it (if not loading or ready) and wait for its verdict."""
        runtime = self._runtimes[model_id]
        runtime.floor_suspended = False
        if runtime.ready:
            return
        await asyncio.shield(self._ensure_loading(runtime))

    async def _load(self, runtime: ModelRuntime, attempt: asyncio.Future[None]) -> None:
        """The model's first replica (requests wait for it); more follow from the scaler."""
        model_id = runtime.model.id
        started = self._clock()
        try:
            async with self._placement.lock:
                await self._placement.make_room(runtime, busy_ok=True)
                replica = self._supervisor.new_replica(runtime)
                runtime.state, runtime.failure = LifecycleState.LOADING, None
            self._metrics.cold_starts.inc()
            self._event(model_id, "loading", f"{runtime.memory_mb} MB")
            await self._supervisor.run_replica(runtime, replica)
        except LifecycleError as exc:
            self._failed(runtime, str(exc))
            attempt.set_exception(exc)
            return
        except Exception as exc:  # a launcher bug must fail the load, not hang its waiters
            log.exception("loading %s failed", model_id)
            self._failed(runtime, f"{type(exc).__name__}: {exc}")
            attempt.set_exception(LoadFailed(f"The model `{model_id}` failed to load: {exc}"))
            return
        runtime.state, runtime.floor_suspended = LifecycleState.READY, False
        runtime.desired = max(runtime.desired, 1)
        runtime.loaded_in_s = self._clock() - started
        runtime.issued_seen = self._issued(replica.address)
        self._metrics.load_seconds.observe(runtime.loaded_in_s)
        self._supervisor.publish_ready(runtime)
        self._event(model_id, "ready", f"loaded in {runtime.loaded_in_s:.1f} s")
        attempt.set_result(None)

    def _failed(self, runtime: ModelRuntime, reason: str) -> None:
        runtime.state, runtime.failure, runtime.failed_at = LifecycleState.FAILED, reason, self._clock()
        self._publish(runtime.model.id, ())
        self._metrics.load_failures.inc()
        self._event(runtime.model.id, "failed", reason)

    async def _give_up(self, runtime: ModelRuntime, reason: str) -> None:
        """A replica keeps failing (lifecycle/supervision.py): the model is unloaded and marked failed."""
        if runtime.state is LifecycleState.READY and runtime.replicas:
            async with self._placement.lock:
                await self._unload(runtime, "its replicas keep failing")
        self._failed(runtime, reason)

    async def _drain(
        self, runtime: ModelRuntime, replicas: list[Replica], timeout_s: float | None = None
    ) -> None:
        """Wait until Envoy's reports (made after this began) show nothing in flight on `replicas`, nor
        the activator forwarding any of the model's requests (it holds `held` until the answer's end);
        at most `timeout_s` (default DRAIN_TIMEOUT_S)."""
        began = self._clock()
        deadline = began + (DRAIN_TIMEOUT_S if timeout_s is None else timeout_s)
        while self._clock() < deadline:
            busy = runtime.held > 0 or any(self._in_flight(r.address) for r in replicas)
            if self._clock() - began >= self._settle_s and not busy:
                return
            await asyncio.sleep(0.2)

    # Unloading
    async def unload(self, model_id: str, reason: str = "asked") -> None:
        """Unload every replica; the model's minimum waits for its next load."""
        runtime = self._runtimes.get(model_id)
        if runtime is None:
            return
        runtime.floor_suspended = True
        async with self._placement.lock:
            await self._unload(runtime, reason)

    async def _unload(self, runtime: ModelRuntime, reason: str) -> None:
        if runtime.state is LifecycleState.LOADING or not runtime.replicas:
            if runtime.state is not LifecycleState.LOADING:
                runtime.state = LifecycleState.COLD
            return
        model_id = runtime.model.id
        runtime.state = LifecycleState.DRAINING
        for replica in runtime.replicas:
            replica.state = LifecycleState.DRAINING
        self._publish(model_id, ())  # new requests go to the activator
        self._event(model_id, "draining", reason)
        await self._drain(runtime, list(runtime.replicas))
        runtime.state = LifecycleState.UNLOADING
        replicas = list(runtime.replicas)
        for replica in replicas:
            replica.state = LifecycleState.UNLOADING
            await replica.engine.stop(STOP_GRACE_S)
            self._supervisor.unlist(runtime, replica)
        runtime.state, runtime.desired = LifecycleState.COLD, 0
        self._scaler.unloaded(model_id)
        self._event(model_id, "unloaded", reason)

    # Admin
    def pin(self, model_id: str, pinned: bool) -> None:
        runtime = self._runtimes[model_id]
        runtime.pinned_by_admin = pinned
        self._event(model_id, "pinned" if pinned else "unpinned", "admin")

    def set_replicas(self, model_id: str, count: int | None) -> None:
        """The admin API's replica count (1..max_replicas), kept until set back to None (the policy
        decides again); the next tick starts or drains replicas toward it. ValueError out of bounds."""
        runtime = self._runtimes[model_id]
        if count is not None and not 1 <= count <= max(runtime.launch.max_replicas, 1):
            raise ValueError(f"count must be between 1 and max_replicas ({runtime.launch.max_replicas})")
        runtime.fixed = count
        self._event(model_id, "replicas set", "by the policy" if count is None else str(count))

    def status(self, model_id: str) -> dict[str, Any]:
        runtime = self._runtimes[model_id]
        return {
            "state": runtime.state.value,
            "reason": runtime.failure,
            "pinned": runtime.pinned,
            "memory_mb": runtime.memory_mb,
            "replicas": [
                {"id": r.id, "address": r.address, "state": r.state.value} for r in runtime.replicas
            ],
            "min_replicas": runtime.launch.min_replicas,
            "max_replicas": runtime.launch.max_replicas,
            "desired_replicas": runtime.desired,
            "fixed_replicas": runtime.fixed,  # set through the admin API; None: the policy decides
            "held_requests": runtime.held,
            "loaded_in_s": runtime.loaded_in_s,
            "launcher": runtime.launch.launcher,
        }

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {model_id: self.status(model_id) for model_id in sorted(self._runtimes)}

    def budget(self) -> dict[str, Any]:
        return {"gpu_memory_mb": self._placement.budget_mb, "used_mb": self._placement.used_mb()}

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self._events)[-limit:][::-1]

    # The periodic pass: warm traffic, idle unloading, autoscaling
    async def tick(self) -> None:
        """Once a second: replicas that served traffic through Envoy are used; idle ones past their
        model's idle time are unloaded (models without a minimum); the others are scaled."""
        now = self._clock()
        for runtime in list(self._runtimes.values()):
            if runtime.state is LifecycleState.READY:
                issued = sum(self._issued(r.address) for r in runtime.replicas)
                if issued != runtime.issued_seen or self._placement.busy(runtime):
                    runtime.issued_seen, runtime.last_used = issued, now
                idle_s = runtime.launch.idle_unload_s
                idle = bool(idle_s) and now - runtime.last_used >= idle_s
                if idle and not runtime.pinned and not runtime.floor:
                    self._metrics.evictions.labels("idle").inc()
                    async with self._placement.lock:
                        await self._unload(runtime, f"idle for {idle_s:g} s")
                    continue
            await self._scaler.step(runtime)
        self._supervisor.check()
        self._scaler.export()

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:  # the loop must outlive a bug in one pass
                log.exception("lifecycle tick failed")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for runtime in self._runtimes.values():
            for replica in runtime.replicas:
                with contextlib.suppress(Exception):
                    await replica.engine.stop(STOP_GRACE_S)
            runtime.replicas = []
        await self._signals.close()

    # Helpers
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _event(self, model_id: str, event: str, detail: str) -> None:
        self._events.append({"at": time.time(), "model": model_id, "event": event, "detail": detail})
        log.info("model %s: %s (%s)", model_id, event, detail)
