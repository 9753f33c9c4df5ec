"""Launched replicas from start to stop, and their replacement when they break (lifecycle/manager.py owns a
`Supervisor`; docs/lifecycle.md, "Replacing a replica").

- `new_replica` lists one more replica of a model (it holds memory from then on; called under the placement
  lock), `run_replica` starts its engine and waits for its readiness, `unlist` forgets a stopped one,
  `publish_ready` pushes a model's ready replicas to Envoy (EDS).
- A ready replica is replaced when its process exits on its own, or when the health prober has marked it
  unhealthy for `launch.restart.unhealthy_after_s` (checked once a tick, `check`): it leaves EDS, an unhealthy
  one is drained for at most `drain_s` (a hung engine never finishes its requests: Envoy retries those the
  stop resets), its engine is stopped, and a new replica is listed at once (so the scaler does not count
  one fewer) and started after a backoff that doubles with each replacement of the window. Was it the
  model's last ready replica, the model is `loading` meanwhile and the activator holds its requests.
- Bounded: the `max_restarts + 1`-th failure within `window_s` gives up: the model is unloaded and marked
  `failed` with the reason (the next request, or the minimum's retry, loads it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from control_plane.config.schema import ModelConfig
from control_plane.lifecycle.autoscale import ReplicaSignalReader
from control_plane.lifecycle.errors import LifecycleError, LoadFailed
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.lifecycle.placement import Placement
from control_plane.lifecycle.replicas import Engine, ModelRuntime, Replica
from control_plane.lifecycle.types import LaunchSpec, LifecycleState, ModelKind
from control_plane.state import LaunchedReplica

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 900.0  # an engine still not ready after this is given up (big models load for minutes)
BROKEN_STOP_GRACE_S = 3.0  # an unhealthy engine's time to exit on SIGTERM (a hung one never will)

EngineFactory = Callable[[LaunchSpec, ModelConfig], Engine]
Publish = Callable[[str, tuple[LaunchedReplica, ...]], None]
Event = Callable[[str, str, str], None]


class Supervisor:
    def __init__(
        self,
        runtimes: Mapping[str, ModelRuntime],
        *,
        engines: EngineFactory,
        publish: Callable[[], Publish],
        placement: Placement,
        signals: ReplicaSignalReader,
        metrics: LifecycleMetrics,
        free_port: Callable[[], int],
        clock: Callable[[], float],
        drain: Callable[[ModelRuntime, list[Replica], float | None], Awaitable[None]],
        give_up: Callable[[ModelRuntime, str], Awaitable[None]],
        failed: Callable[[ModelRuntime, str], None],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        event: Event,
    ) -> None:
        """The manager's pieces: `publish()` its current publisher; `drain(runtime, replicas, timeout)` waits
        until nothing is in flight on them; `give_up(runtime, reason)` unloads the model and marks it failed,
        `failed(runtime, reason)` only marks it; `spawn` runs a task the manager cancels on close."""
        self._runtimes = runtimes
        self._engines = engines
        self._publish = publish
        self._placement = placement
        self._signals = signals
        self._metrics = metrics
        self._free_port = free_port
        self._clock = clock
        self._drain = drain
        self._give_up = give_up
        self._failed = failed
        self._spawn = spawn
        self._event = event
        self._unhealthy: Callable[[str], bool] = lambda replica_id: False

    def set_health(self, unhealthy: Callable[[str], bool]) -> None:
        """`unhealthy(replica_id)`: the health prober's verdict on a published replica."""
        self._unhealthy = unhealthy

    def serving(self, runtime: ModelRuntime) -> list[Replica]:
        """The ready replicas the probes have not marked unhealthy (all ready ones if every one is)."""
        return [r for r in runtime.ready if not self._unhealthy(r.id)] or runtime.ready

    # Starting and stopping
    def new_replica(self, runtime: ModelRuntime) -> Replica:
        """A replica's engine, listed (it holds memory from now on); called under the placement lock."""
        model, launch = runtime.model, runtime.launch
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
            # The engine answers to the aliases too, unless the registry names the one name it serves.
            aliases=model.aliases if model.served_model is None else (),
        )
        replica = Replica(id=f"{model.id}-launched-{port}", port=port, engine=self._engines(spec, model))
        runtime.replicas.append(replica)
        return replica

    async def run_replica(self, runtime: ModelRuntime, replica: Replica) -> None:
        """Start a listed replica and wait until it is ready; on failure it is stopped and unlisted."""
        engine = replica.engine
        try:
            await engine.start()
            engine.on_exit(lambda code, tail: self._exited(runtime, replica, code, tail))
            await engine.wait_ready(LOAD_TIMEOUT_S)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await engine.stop(BROKEN_STOP_GRACE_S)
            self.unlist(runtime, replica)
            raise LoadFailed(f"The model `{runtime.model.id}` failed to load: {exc}") from exc
        if replica in runtime.replicas:  # not stopped meanwhile by an unload
            replica.state = LifecycleState.READY

    def unlist(self, runtime: ModelRuntime, replica: Replica) -> None:
        if replica in runtime.replicas:
            runtime.replicas.remove(replica)
        self._signals.forget([replica.address])

    def publish_ready(self, runtime: ModelRuntime) -> None:
        ready = tuple(LaunchedReplica(r.id, "127.0.0.1", r.port) for r in runtime.ready)
        self._publish()(runtime.model.id, ready)

    # Watching
    def check(self) -> None:
        """The tick's pass: replace ready replicas the probes have marked unhealthy for long enough."""
        now = self._clock()
        for runtime in self._runtimes.values():
            if runtime.state is not LifecycleState.READY:
                continue
            for replica in runtime.ready:
                if not self._unhealthy(replica.id):
                    replica.unhealthy_since = None
                    continue
                if replica.unhealthy_since is None:
                    replica.unhealthy_since = now
                after = runtime.launch.restart.unhealthy_after_s
                if now - replica.unhealthy_since >= after:
                    reason = f"probed unhealthy for {now - replica.unhealthy_since:.0f} s"
                    self._start_replacing(runtime, replica, reason, exited=False)

    def _exited(self, runtime: ModelRuntime, replica: Replica, code: int, tail: str) -> None:
        if replica not in runtime.replicas or replica.state is LifecycleState.LOADING:
            return  # stopped on purpose, or still loading (its loader reports the failure)
        reason = f"engine exited with code {code}: {tail[-300:]}"
        if replica.state is not LifecycleState.READY:  # leaving anyway (drained, unloading)
            self.unlist(runtime, replica)
            return
        self._start_replacing(runtime, replica, reason, exited=True)

    def _start_replacing(self, runtime: ModelRuntime, replica: Replica, reason: str, *, exited: bool) -> None:
        """Take the replica out of service now (synchronously, so a second check does not see it ready)
        and replace it in a task."""
        model_id = runtime.model.id
        replica.state = LifecycleState.DRAINING
        runtime.changes += 1
        attempt: asyncio.Future[None] | None = None
        if not runtime.ready:  # the last one: requests wait in the activator for the new one
            runtime.state = LifecycleState.LOADING
            attempt = asyncio.get_running_loop().create_future()
            attempt.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
            runtime.attempt = attempt
        self.publish_ready(runtime)
        what = "replica exited" if exited else "replica unhealthy"
        self._event(model_id, what, f"{replica.address}: {reason}")
        self._spawn(self._replace(runtime, replica, reason, exited, attempt))

    async def _replace(
        self,
        runtime: ModelRuntime,
        replica: Replica,
        reason: str,
        exited: bool,
        attempt: asyncio.Future[None] | None,
    ) -> None:
        model_id, settings = runtime.model.id, runtime.launch.restart
        try:
            if not exited:
                await self._drain(runtime, [replica], settings.drain_s)
            replica.state = LifecycleState.UNLOADING
            await replica.engine.stop(BROKEN_STOP_GRACE_S)
            self.unlist(runtime, replica)
            now = self._clock()
            runtime.restarts = [t for t in runtime.restarts if now - t < settings.window_s]
            if len(runtime.restarts) >= settings.max_restarts:
                why = (
                    f"a replica failed {len(runtime.restarts) + 1} times within {settings.window_s:g} s "
                    f"(max_restarts {settings.max_restarts}); last: {reason}"
                )
                await self._give_up(runtime, why)
                _settle(attempt, LoadFailed(f"The model `{model_id}` failed: {why}"))
                return
            runtime.restarts.append(now)
            self._metrics.restarts.labels(model_id, "exited" if exited else "unhealthy").inc()
            async with self._placement.lock:
                # Its own memory was just freed; a first load (the last replica) may evict like any load.
                await self._placement.make_room(runtime, busy_ok=attempt is not None)
                new = self.new_replica(runtime)
            delay = settings.backoff(len(runtime.restarts))
            count = f"{len(runtime.restarts)} of {settings.max_restarts} in {settings.window_s:g} s"
            self._event(model_id, "replica restarting", f"in {delay:g} s ({count})")
            await asyncio.sleep(delay)
            await self.run_replica(runtime, new)
        except Exception as exc:  # a bug too must not leave held requests waiting
            if not isinstance(exc, LifecycleError):
                log.exception("replacing a replica of %s failed", model_id)
                exc = LoadFailed(f"The model `{model_id}` failed to restart: {exc}")
            if runtime.ready or attempt is None:
                self._event(model_id, "replica failed", str(exc)[:500])
            else:
                self._failed(runtime, str(exc))
            _settle(attempt, exc)
            return
        finally:
            runtime.changes -= 1
        if new.state is LifecycleState.READY:
            if runtime.state is LifecycleState.LOADING:
                runtime.state = LifecycleState.READY
            self.publish_ready(runtime)
            self._event(model_id, "replica ready", f"{new.address} replaces {replica.address}")
        _settle(attempt, None)


def _settle(attempt: asyncio.Future[None] | None, error: BaseException | None) -> None:
    """Wake the requests the activator holds for a replaced last replica."""
    if attempt is None or attempt.done():
        return
    if error is None:
        attempt.set_result(None)
    else:
        attempt.set_exception(error)
