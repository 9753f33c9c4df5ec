"""The memory budget of launched models: room for one more replica, made by evictions (lifecycle/manager.py).

- Every replica listed holds its model's `memory_mb` of the budget (registry `lifecycle.gpu_memory_mb`; none
  set: no limit) until its engine has stopped.
- Evictions: loading a model that does not fit unloads ready, unpinned models, least recently used first
  (idle ones before busy ones, which are drained first: a generation is never cut); a model with a
  minimum gives up one replica above it instead. A first load may evict busy models, a scale-up (lifecycle/
  scaling.py) only idle ones. Pinned, loading and minimum replicas are never evicted: a model that needs
  their room does not fit (`DoesNotFit`).
- One placement decision (and its evictions) at a time: callers hold `lock` around `make_room` and the
  listing of the new replica, so two loads never count the same free memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from control_plane.lifecycle.errors import DoesNotFit
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.lifecycle.replicas import ModelRuntime
from control_plane.lifecycle.types import LifecycleState

Evict = Callable[[ModelRuntime, str], Awaitable[None]]


class Placement:
    def __init__(
        self,
        runtimes: Mapping[str, ModelRuntime],
        *,
        metrics: LifecycleMetrics,
        in_flight: Callable[[str], int],
        shed_replica: Evict,
        unload: Evict,
    ) -> None:
        """`shed_replica` drains and stops one replica above the model's minimum; `unload` the whole model
        (both called under `lock`)."""
        self._runtimes = runtimes
        self._metrics = metrics
        self._in_flight = in_flight
        self._shed_replica = shed_replica
        self._unload = unload
        self.budget_mb: int | None = None
        self.lock = asyncio.Lock()  # one placement decision (and its evictions) at a time

    def used_mb(self) -> int:
        return sum(r.held_mb for r in self._runtimes.values())

    def busy(self, runtime: ModelRuntime) -> bool:
        return runtime.held > 0 or any(self._in_flight(r.address) for r in runtime.replicas)

    async def make_room(self, runtime: ModelRuntime, *, busy_ok: bool) -> None:
        """Room for one more replica of `runtime`; a first load may evict busy models (drained first), a
        scale-up only idle ones."""
        budget = self.budget_mb
        if budget is None:
            return
        need = runtime.memory_mb
        if need > budget:
            raise DoesNotFit(f"The model `{runtime.model.id}` needs {need} MB; the budget is {budget} MB.")
        while True:
            used = self.used_mb()
            if used + need <= budget:
                return
            victims = [
                r
                for r in self._runtimes.values()
                if r is not runtime
                and r.state is LifecycleState.READY
                and not r.pinned
                and len(r.ready) > r.floor
                and (busy_ok or not self.busy(r))
            ]
            if not victims:
                raise DoesNotFit(
                    f"The model `{runtime.model.id}` needs {need} MB; {used} of {budget} MB are held by "
                    "pinned, busy, minimum or loading replicas."
                )
            # Idle first, then least recently used: a busy model is drained, never cut.
            victim = min(victims, key=lambda r: (self.busy(r), r.last_used))
            self._metrics.evictions.labels("budget").inc()
            if victim.floor:
                await self._shed_replica(victim, f"evicted for {runtime.model.id}")
            else:
                await self._unload(victim, f"evicted for {runtime.model.id}")
