"""The local stack's supervisor: backoff growth, its cap, its reset after a stable run, reporting."""

from __future__ import annotations

import pytest

from control_plane.devstack.supervisor import Backoff, Supervisor, Target

pytestmark = pytest.mark.unit


class FakeProcess:
    def __init__(self) -> None:
        self.up = True
        self.starts = 0
        self.fail_start = False

    def restart(self) -> None:
        self.starts += 1
        if self.fail_start:
            raise RuntimeError("exited at once\nlong log")
        self.up = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(backoff: Backoff) -> tuple[Supervisor, FakeProcess, Clock, list[str]]:
    process, clock, lines = FakeProcess(), Clock(), []
    target = Target("envoy", lambda: process.up, process.restart, lambda: "exit status -9")
    supervisor = Supervisor(lambda: [target], report=lines.append, backoff=backoff, clock=clock)
    supervisor.check()
    return supervisor, process, clock, lines


def die_and_restart(supervisor: Supervisor, process: FakeProcess, clock: Clock) -> float:
    """Kill the process; advance time until the supervisor restarts it; return the delay it waited."""
    process.up = False
    died = clock.now
    supervisor.check()
    for _ in range(1000):
        if process.up:
            return clock.now - died
        clock.now += 0.125  # exact in binary: no drift
        supervisor.check()
    raise AssertionError("never restarted")


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_stable_run() -> None:
    supervisor, process, clock, lines = make(Backoff(initial_s=0.5, factor=2, max_s=4, stable_after_s=30))
    delays = [die_and_restart(supervisor, process, clock) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert supervisor.restarts == {"envoy": 6}
    clock.now += 31  # up for a stable period
    supervisor.check()
    assert die_and_restart(supervisor, process, clock) == 0.5
    assert any("envoy died (exit status -9); restarting in 0.5s" in line for line in lines)
    assert lines[-1] == "[supervisor] envoy restarted (7 restarts so far)"


def test_a_failed_restart_counts_as_another_death() -> None:
    supervisor, process, clock, lines = make(Backoff(initial_s=1, factor=2, max_s=60, stable_after_s=30))
    process.fail_start = True
    process.up = False
    for _ in range(80):
        supervisor.check()
        clock.now += 0.125  # exact in binary: no drift
    # Attempts at 1 s, then 2 s after that failure is seen, then 4 s after the next: three in 10 s.
    assert process.starts == 3
    assert any("did not start again: exited at once" in line for line in lines)
    assert not any("long log" in line for line in lines)


def test_a_target_no_longer_listed_is_not_restarted() -> None:
    process, lines = FakeProcess(), []
    targets = [Target("sim", lambda: process.up, process.restart)]
    supervisor = Supervisor(lambda: targets, report=lines.append, backoff=Backoff(initial_s=0))
    targets.clear()  # stopped on purpose by the stack
    process.up = False
    supervisor.check()
    assert process.starts == 0 and lines == []
