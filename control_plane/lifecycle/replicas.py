"""What the lifecycle manager keeps per launched model and per replica (lifecycle/manager.py).

A model's state (`cold` … `failed`) is the model's as clients see it; each replica has its own (`loading`,
`ready`, `draining`, `unloading`) so a model can be `ready` while one more replica loads or one drains.
Every replica listed holds its model's `memory_mb` of the budget until its engine has stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from control_plane.config.lifecycle import LaunchSettings
from control_plane.config.schema import ModelConfig
from control_plane.lifecycle.types import LifecycleState

DEFAULT_MEMORY_MB = 1024
STOP_GRACE_S = 10.0  # a stopped engine's time to exit cleanly before it is killed
_DEFAULT_LAUNCH = LaunchSettings()


class Engine(Protocol):
    """A started engine process (lifecycle/process.py)."""

    async def start(self) -> None: ...

    async def wait_ready(self, timeout_s: float) -> None: ...

    async def stop(self, grace_s: float) -> object: ...

    def on_exit(self, callback: Callable[[int, str], object]) -> None: ...


@dataclass(eq=False)  # compared by identity: two replicas are never the same one
class Replica:
    id: str
    port: int
    engine: Engine
    state: LifecycleState = LifecycleState.LOADING
    unhealthy_since: float | None = None  # when the manager first saw the probes' unhealthy verdict

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class ModelRuntime:
    model: ModelConfig
    state: LifecycleState = LifecycleState.COLD
    replicas: list[Replica] = field(default_factory=list)  # every one holding memory, whatever its state
    attempt: asyncio.Future[None] | None = None  # the current first load: waiters await it
    task: asyncio.Task[None] | None = None
    failure: str | None = None
    failed_at: float | None = None
    last_used: float = 0.0
    held: int = 0  # requests in the activator: waiting or being forwarded
    pinned_by_admin: bool | None = None
    issued_seen: int = 0
    loaded_in_s: float | None = None
    desired: int = 0  # replicas it should have (the autoscaling policy's answer while loaded)
    floor_suspended: bool = False  # unloaded by the admin API: min_replicas waits for the next load
    changes: int = 0  # replicas being added, removed or replaced: the scaler waits for them
    restarts: list[float] = field(default_factory=list)  # when replicas were replaced (supervision.py)
    blocked: str | None = None  # why the last scale-up found no room (reported once)
    turn: int = 0  # round robin among equally loaded replicas for the activator
    fixed: int | None = None  # replicas set through the admin API: the policy is not asked meanwhile

    @property
    def scaling(self) -> bool:
        """A replica change is under way: the scaler makes one at a time."""
        return self.changes > 0

    @property
    def launch(self) -> LaunchSettings:
        return self.model.launch or _DEFAULT_LAUNCH

    @property
    def memory_mb(self) -> int:
        return self.launch.memory_mb or DEFAULT_MEMORY_MB

    @property
    def held_mb(self) -> int:
        return len(self.replicas) * self.memory_mb

    @property
    def pinned(self) -> bool:
        configured = self.launch.pinned
        return self.pinned_by_admin if self.pinned_by_admin is not None else configured

    @property
    def floor(self) -> int:
        """Replicas kept whatever the load: min_replicas, unless an admin unload suspended it."""
        return 0 if self.floor_suspended else self.launch.min_replicas

    def in_state(self, *states: LifecycleState) -> list[Replica]:
        return [r for r in self.replicas if r.state in states]

    @property
    def ready(self) -> list[Replica]:
        return self.in_state(LifecycleState.READY)

    @property
    def active(self) -> list[Replica]:
        """Replicas that serve or soon will: what counts toward `desired`."""
        return self.in_state(LifecycleState.LOADING, LifecycleState.READY)
