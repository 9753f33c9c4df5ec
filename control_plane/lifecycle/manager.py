"""Launched models through their states (cold → loading → ready → draining → unloading → cold, or failed),
under a memory budget, one load per model however many requests want it (docs/lifecycle.md).

Contract with the rest of the control plane:
- `publish(model_id, replicas)` is told every change of a model's ready replicas; the control plane pushes
  them as the model's endpoints (EDS). With none ready, Envoy sends the model's requests to the activator.
- `acquire(model_id)` (the activator, for a request Envoy sent it) loads the model if needed and waits for
  a ready replica, at most the model's activation timeout; `release` when that request is done.
- `in_flight(address)` and `issued(address)` read Envoy's load reports (LRS) for a replica: a model is
  unloaded only once no request is in flight on it, and a replica serving traffic is not idle.
- Evictions: loading a model that does not fit unloads ready, unpinned models, least recently used first
  (idle ones before busy ones, which are drained first: a generation is never cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from control_plane.config.schema import ModelConfig, Registry
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.lifecycle.types import LaunchSpec, LifecycleState, ModelKind
from control_plane.state import LaunchedReplica

log = logging.getLogger(__name__)

DEFAULT_MEMORY_MB = 1024
LOAD_TIMEOUT_S = 900.0  # an engine still not ready after this is given up (big models load for minutes)
DRAIN_TIMEOUT_S = 600.0
STOP_GRACE_S = 10.0


class LifecycleError(Exception):
    """Why a request for a launched model could not be served; `code` is the client's error code."""

    code = "model_unavailable"


class LoadingTimeout(LifecycleError):
    code = "model_loading_timeout"


class LoadFailed(LifecycleError):
    code = "model_load_failed"


class DoesNotFit(LoadFailed):
    code = "model_does_not_fit"


class Engine(Protocol):
    """A started engine process (lifecycle/process.py)."""

    async def start(self) -> None: ...

    async def wait_ready(self, timeout_s: float) -> None: ...

    async def stop(self, grace_s: float) -> object: ...

    def on_exit(self, callback: Callable[[int, str], object]) -> None: ...


EngineFactory = Callable[[LaunchSpec, ModelConfig], Engine]
Publish = Callable[[str, tuple[LaunchedReplica, ...]], None]


@dataclass
class _Replica:
    id: str
    port: int
    engine: Engine

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class _Runtime:
    model: ModelConfig
    state: LifecycleState = LifecycleState.COLD
    replicas: list[_Replica] = field(default_factory=list)
    attempt: asyncio.Future[None] | None = None  # the current load: waiters await it
    task: asyncio.Task[None] | None = None
    failure: str | None = None
    last_used: float = 0.0
    held: int = 0  # requests in the activator: waiting or being forwarded
    pinned_by_admin: bool | None = None
    issued_seen: int = 0
    loaded_in_s: float | None = None

    @property
    def memory_mb(self) -> int:
        launch = self.model.launch
        return (launch.memory_mb if launch and launch.memory_mb else None) or DEFAULT_MEMORY_MB

    @property
    def pinned(self) -> bool:
        configured = bool(self.model.launch and self.model.launch.pinned)
        return self.pinned_by_admin if self.pinned_by_admin is not None else configured

    @property
    def holds_memory(self) -> bool:
        return self.state in (
            LifecycleState.LOADING,
            LifecycleState.READY,
            LifecycleState.DRAINING,
            LifecycleState.UNLOADING,
        )


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
    ) -> None:
        self._publish = publish
        self._engines = engines
        self._metrics = metrics
        self._in_flight = in_flight
        self._issued = issued
        self._free_port = free_port
        self._clock = clock
        self._log_dir = log_dir
        # Envoys report their requests in flight (LRS) this often: a drain trusts "none in flight" only
        # from reports made after it began, so a request that started just before is never cut.
        self._settle_s = 2 * report_interval_s + 0.5
        self._runtimes: dict[str, _Runtime] = {}
        self._budget_mb: int | None = None
        self._placement = asyncio.Lock()  # one placement decision (and its evictions) at a time
        self._events: deque[dict[str, Any]] = deque(maxlen=500)
        self._tasks: set[asyncio.Task[Any]] = set()

    def set_publisher(self, publish: Publish) -> None:
        self._publish = publish

    # Following the registry
    async def follow(self, registry: Registry) -> None:
        """A registry listener: launched models appear cold, removed ones are unloaded."""
        self._budget_mb = registry.lifecycle.gpu_memory_mb
        launched = {m.id: m for m in registry.models if m.launch is not None}
        for model_id, model in launched.items():
            runtime = self._runtimes.get(model_id)
            if runtime is None:
                self._runtimes[model_id] = _Runtime(model=model)
                self._event(model_id, "discovered", f"{model.launch.launcher if model.launch else ''}")
            else:
                runtime.model = model
        for model_id in [m for m in self._runtimes if m not in launched]:
            self._spawn(self._forget(model_id))

    async def _forget(self, model_id: str) -> None:
        await self.unload(model_id, "removed from the registry")
        self._runtimes.pop(model_id, None)

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
            if runtime.state is not LifecycleState.READY or not runtime.replicas:
                attempt = self._ensure_loading(runtime)
                timeout = runtime.model.launch.activation_timeout_s if runtime.model.launch else 120.0
                try:
                    await asyncio.wait_for(asyncio.shield(attempt), timeout)
                except TimeoutError:
                    raise LoadingTimeout(
                        f"The model `{model_id}` is still loading after {timeout:g} s. Retry shortly."
                    ) from None
            replica = runtime.replicas[0] if runtime.replicas else None
            if replica is None:
                raise LoadFailed(f"The model `{model_id}` has no ready replica.")
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
    def _ensure_loading(self, runtime: _Runtime) -> asyncio.Future[None]:
        if runtime.attempt is None or runtime.attempt.done():
            runtime.attempt = asyncio.get_running_loop().create_future()
            runtime.attempt.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            runtime.task = self._spawn(self._load(runtime, runtime.attempt))
        return runtime.attempt

    async def load(self, model_id: str) -> None:
        """The admin API's load: start it (if not loading or ready) and wait for its verdict."""
        runtime = self._runtimes[model_id]
        if runtime.state is LifecycleState.READY:
            return
        await asyncio.shield(self._ensure_loading(runtime))

    async def _load(self, runtime: _Runtime, attempt: asyncio.Future[None]) -> None:
        model_id = runtime.model.id
        started = self._clock()
        try:
            async with self._placement:
                await self._make_room(runtime)
                runtime.state, runtime.failure = LifecycleState.LOADING, None
            self._metrics.cold_starts.inc()
            self._event(model_id, "loading", f"{runtime.memory_mb} MB")
            replica = await self._start_replica(runtime)
        except LifecycleError as exc:
            self._failed(runtime, str(exc))
            attempt.set_exception(exc)
            return
        except Exception as exc:  # a launcher bug must fail the load, not hang its waiters
            log.exception("loading %s failed", model_id)
            self._failed(runtime, f"{type(exc).__name__}: {exc}")
            attempt.set_exception(LoadFailed(f"The model `{model_id}` failed to load: {exc}"))
            return
        runtime.replicas = [replica]
        runtime.state = LifecycleState.READY
        runtime.loaded_in_s = self._clock() - started
        runtime.issued_seen = self._issued(replica.address)
        self._metrics.load_seconds.observe(runtime.loaded_in_s)
        self._publish(model_id, (LaunchedReplica(replica.id, "127.0.0.1", replica.port),))
        self._event(model_id, "ready", f"loaded in {runtime.loaded_in_s:.1f} s")
        attempt.set_result(None)

    async def _start_replica(self, runtime: _Runtime) -> _Replica:
        model = runtime.model
        launch = model.launch
        assert launch is not None
        port = self._free_port()
        kind = ModelKind.CHAT if model.engine.value != "tei" else ModelKind.EMBEDDING
        spec = LaunchSpec(
            model_id=model.id,
            served_name=model.served_model or model.id,
            kind=kind,
            port=port,
            path=Path(launch.path) if launch.path else None,
            gpus=launch.gpus,
            memory_mb=runtime.memory_mb,
            extra_args=launch.extra_args,
        )
        engine = self._engines(spec, model)
        await engine.start()
        replica = _Replica(id=f"{model.id}-launched-{port}", port=port, engine=engine)
        engine.on_exit(lambda code, tail: self._exited(runtime, replica, code, tail))
        try:
            await engine.wait_ready(LOAD_TIMEOUT_S)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await engine.stop(STOP_GRACE_S)
            raise LoadFailed(f"The model `{model.id}` failed to load: {exc}") from exc
        return replica

    def _failed(self, runtime: _Runtime, reason: str) -> None:
        runtime.state, runtime.failure, runtime.replicas = LifecycleState.FAILED, reason, []
        self._publish(runtime.model.id, ())
        self._metrics.load_failures.inc()
        self._event(runtime.model.id, "failed", reason)

    def _exited(self, runtime: _Runtime, replica: _Replica, code: int, tail: str) -> None:
        if replica not in runtime.replicas:
            return  # stopped on purpose, or an earlier load
        reason = f"engine exited with code {code}: {tail[-300:]}"
        runtime.replicas.remove(replica)
        self._failed(runtime, reason)

    async def _make_room(self, runtime: _Runtime) -> None:
        budget = self._budget_mb
        if budget is None:
            return
        need = runtime.memory_mb
        if need > budget:
            raise DoesNotFit(f"The model `{runtime.model.id}` needs {need} MB; the budget is {budget} MB.")
        while True:
            used = sum(r.memory_mb for r in self._runtimes.values() if r.holds_memory and r is not runtime)
            if used + need <= budget:
                return
            victims = [
                r
                for r in self._runtimes.values()
                if r is not runtime and r.state is LifecycleState.READY and not r.pinned
            ]
            if not victims:
                raise DoesNotFit(
                    f"The model `{runtime.model.id}` needs {need} MB; {used} of {budget} MB are held by "
                    "pinned or loading models."
                )
            # Idle first, then least recently used: a busy model is drained, never cut.
            victim = min(victims, key=lambda r: (self._busy(r), r.last_used))
            self._metrics.evictions.labels("budget").inc()
            await self._unload(victim, f"evicted for {runtime.model.id}")

    def _busy(self, runtime: _Runtime) -> bool:
        return runtime.held > 0 or any(self._in_flight(r.address) for r in runtime.replicas)

    # Unloading
    async def unload(self, model_id: str, reason: str = "asked") -> None:
        runtime = self._runtimes.get(model_id)
        if runtime is None:
            return
        async with self._placement:
            await self._unload(runtime, reason)

    async def _unload(self, runtime: _Runtime, reason: str) -> None:
        if not runtime.replicas:
            if runtime.state is not LifecycleState.LOADING:
                runtime.state = LifecycleState.COLD
            return
        model_id = runtime.model.id
        runtime.state = LifecycleState.DRAINING
        self._publish(model_id, ())  # new requests go to the activator
        self._event(model_id, "draining", reason)
        began = self._clock()
        deadline = began + DRAIN_TIMEOUT_S
        while self._clock() < deadline:
            if self._clock() - began >= self._settle_s and not self._busy_serving(runtime):
                break
            await asyncio.sleep(0.2)
        runtime.state = LifecycleState.UNLOADING
        replicas, runtime.replicas = runtime.replicas, []
        for replica in replicas:
            await replica.engine.stop(STOP_GRACE_S)
        runtime.state = LifecycleState.COLD
        self._event(model_id, "unloaded", reason)

    def _busy_serving(self, runtime: _Runtime) -> bool:
        """Requests still running on the replicas: Envoy's in flight (LRS), or forwarded by the activator
        (it holds `held` until the answer's end; waiting ones are not on these replicas)."""
        return any(self._in_flight(r.address) for r in runtime.replicas) or runtime.held > 0

    # Admin
    def pin(self, model_id: str, pinned: bool) -> None:
        runtime = self._runtimes[model_id]
        runtime.pinned_by_admin = pinned
        self._event(model_id, "pinned" if pinned else "unpinned", "admin")

    def status(self, model_id: str) -> dict[str, Any]:
        runtime = self._runtimes[model_id]
        return {
            "state": runtime.state.value,
            "reason": runtime.failure,
            "pinned": runtime.pinned,
            "memory_mb": runtime.memory_mb,
            "replicas": [{"id": r.id, "address": r.address} for r in runtime.replicas],
            "held_requests": runtime.held,
            "loaded_in_s": runtime.loaded_in_s,
            "launcher": runtime.model.launch.launcher if runtime.model.launch else None,
        }

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {model_id: self.status(model_id) for model_id in sorted(self._runtimes)}

    def budget(self) -> dict[str, Any]:
        used = sum(r.memory_mb for r in self._runtimes.values() if r.holds_memory)
        return {"gpu_memory_mb": self._budget_mb, "used_mb": used}

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self._events)[-limit:][::-1]

    # Idle unloading and warm traffic
    async def tick(self) -> None:
        """Once a second: replicas that served traffic through Envoy are used; idle ones past their
        model's idle time are unloaded."""
        now = self._clock()
        for runtime in list(self._runtimes.values()):
            if runtime.state is not LifecycleState.READY:
                continue
            issued = sum(self._issued(r.address) for r in runtime.replicas)
            if issued != runtime.issued_seen or self._busy(runtime):
                runtime.issued_seen, runtime.last_used = issued, now
                continue
            idle_s = runtime.model.launch.idle_unload_s if runtime.model.launch else 0
            if idle_s and not runtime.pinned and now - runtime.last_used >= idle_s:
                self._metrics.evictions.labels("idle").inc()
                await self.unload(runtime.model.id, f"idle for {idle_s:g} s")

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

    # Helpers
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _event(self, model_id: str, event: str, detail: str) -> None:
        self._events.append({"at": time.time(), "model": model_id, "event": event, "detail": detail})
        log.info("model %s: %s (%s)", model_id, event, detail)
