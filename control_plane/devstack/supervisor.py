"""Restart the local stack's processes when they die: exponential backoff, capped, reset after a stable run.

    supervisor = Supervisor(stack.supervised_targets, report=print)
    supervisor.check()                 # one pass: notice dead processes, restart those whose delay is over
    supervisor.start_thread()          # or: passes every 0.5 s on a thread, until stop()

Targets are asked for at every pass, so a process the stack stops on purpose (it drops it from its
targets) is never restarted, and one it adds is watched at once. Each death and each restart is reported
(a line for the console and the stack's log) and counted per target (`restarts`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th restart in a row: initial_s * factor^(n-1), at most max_s. A process that
    stayed up for stable_after_s starts again from initial_s."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    stable_after_s: float = 60.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.initial_s * self.factor ** max(0, attempt - 1)))


@dataclass(frozen=True)
class Target:
    """One supervised process: how to tell it is alive, how to start it again, what to say when it died."""

    name: str
    alive: Callable[[], bool]
    restart: Callable[[], object]
    exit_info: Callable[[], str] = lambda: ""


@dataclass
class _State:
    started_at: float
    attempts: int = 0  # restarts in a row, without a stable period between them
    restarts: int = 0
    retry_at: float | None = None  # set while the process is down and a restart is scheduled


@dataclass
class Supervisor:
    targets: Callable[[], Sequence[Target]]
    report: Callable[[str], None] = print
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic
    _states: dict[str, _State] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far, per target name."""
        return {name: state.restarts for name, state in self._states.items() if state.restarts}

    def check(self) -> None:
        """One pass over the targets."""
        with self._lock:
            for target in self.targets():
                if self._stop.is_set():
                    return
                self._check_one(target)

    def _check_one(self, target: Target) -> None:
        now = self.clock()
        state = self._states.setdefault(target.name, _State(started_at=now))
        if target.alive():
            if state.attempts and now - state.started_at >= self.backoff.stable_after_s:
                state.attempts = 0
            return
        if state.retry_at is None:
            if now - state.started_at >= self.backoff.stable_after_s:
                state.attempts = 0
            state.attempts += 1
            delay = self.backoff.delay(state.attempts)
            state.retry_at = now + delay
            info = target.exit_info()
            self.report(
                f"[supervisor] {target.name} died{f' ({info})' if info else ''}; "
                f"restarting in {delay:.1f}s (attempt {state.attempts})"
            )
        if now < state.retry_at:
            return
        state.retry_at = None
        state.started_at = now
        state.restarts += 1
        try:
            target.restart()
        except (RuntimeError, TimeoutError, OSError, ValueError) as exc:  # one more death: backoff grows
            self.report(f"[supervisor] {target.name} did not start again: {str(exc).splitlines()[0]}")
            return
        self.report(f"[supervisor] {target.name} restarted ({state.restarts} restarts so far)")

    # Background passes (tests; `make run` calls check() from its own loop)
    def start_thread(self, interval_s: float = 0.5) -> Supervisor:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check()
                except Exception:  # the supervisor must outlive any one bad pass
                    log.exception("supervisor pass failed")

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="devstack-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """No more restarts; waits for a restart in progress to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None
