"""One launched engine process: started in its own process group with its output in a log file, waited on
until its /health answers 200, stopped by process group, and its exit noticed.

asyncio only (the lifecycle manager's loop): `asyncio.create_subprocess_exec` and a watcher task per process,
no threads. Every wait is bounded; signals go to the process group this started, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from control_plane.lifecycle.launchers import environment_for
from control_plane.lifecycle.types import Launcher, LaunchSpec
from control_plane.secret_files import private_dir

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"  # vLLM, TGI, TEI, llama.cpp and the simulator all answer it (200 once loaded)
LOG_TAIL_BYTES = 4000
KILL_WAIT_S = 10.0  # after SIGKILL the kernel ends the process at once; this only bounds a stuck reap
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

ExitCallback = Callable[[int, str], object]  # (return code, log tail); may return an awaitable


class LaunchFailed(Exception):
    """The engine did not become ready: it could not be started, exited first, or the wait timed out."""

    def __init__(self, reason: str, log_tail: str = "", returncode: int | None = None) -> None:
        super().__init__(f"{reason}\n--- engine log (tail) ---\n{log_tail}" if log_tail else reason)
        self.reason = reason
        self.log_tail = log_tail
        self.returncode = returncode


class EngineProcess:
    """One replica's engine: `await start()`, `await wait_ready(t)`, `await stop(grace)`; `on_exit(cb)` is
    called once if the process ends on its own (a crash, an OOM kill), not when `stop()` ended it."""

    def __init__(
        self,
        spec: LaunchSpec,
        launcher: Launcher,
        log_dir: Path,
        *,
        cwd: Path | None = None,
        health_path: str = HEALTH_PATH,
    ) -> None:
        self.spec = spec
        self.launcher = launcher
        self.argv = launcher.command(spec)  # rendered now: a bad spec fails before anything starts
        self.env = environment_for(launcher, spec)
        self.cwd = cwd
        self.health_path = health_path
        name = _UNSAFE.sub("_", f"{spec.model_id}-{spec.port}")
        self.log_path = log_dir / f"{name}.log"
        self._proc: asyncio.subprocess.Process | None = None
        self._log_from = 0  # where this run's output begins in the (appended) log
        self._exited = asyncio.Event()
        self._stopping = False
        self._callbacks: list[ExitCallback] = []
        self._watcher: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """None while running (or before start); negative: ended by that signal."""
        return self._proc.returncode if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._exited.is_set()

    @property
    def url(self) -> str:
        host = self.spec.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # a wildcard bind is probed on loopback
        return f"http://[{host}]:{self.spec.port}" if ":" in host else f"http://{host}:{self.spec.port}"

    def on_exit(self, callback: ExitCallback) -> None:
        """Call `callback(returncode, log_tail)` once when the process exits on its own."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError(f"engine {self.log_path.stem} already started")
        # The log may hold what an engine prints about its settings (tokens included): private, 0600.
        private_dir(self.log_path.parent)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)
            self._log_from = os.fstat(fd).st_size
            os.write(
                fd, f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode()
            )
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=fd,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, **self.env},
                    cwd=self.cwd,
                    # Its own session and process group: stop() signals the whole group (engines fork
                    # workers: vLLM's engine core, TGI's shards), and a terminal's Ctrl-C does not reach it.
                    start_new_session=True,
                )
            except OSError as exc:
                os.write(fd, f"cannot start {self.argv[0]}: {exc}\n".encode())
                raise LaunchFailed(f"cannot start {self.argv[0]!r}: {exc}", self.log_tail()) from exc
        finally:
            os.close(fd)  # the child holds its own copy
        self._watcher = asyncio.create_task(self._watch(), name=f"engine-exit-{self.log_path.stem}")

    async def wait_ready(self, timeout_s: float, interval_s: float = 0.02) -> None:
        """Poll /health until 200. `LaunchFailed` (with the log's tail) if the process exits first or
        `timeout_s` passes; the process is left running then: the caller decides to stop it. Every 20 ms:
        a held request waits for this poll on top of the engine's own load (docs/benchmarks.md, model
        activation: 100 ms polls cost about 50 ms at the median), and /health is cheap for an engine."""
        if self._proc is None:
            raise RuntimeError("wait_ready() before start()")
        url = self.url + self.health_path
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        async with aiohttp.ClientSession() as session:
            while True:
                if self._exited.is_set():
                    raise self._exited_early()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LaunchFailed(
                        f"engine not ready within {timeout_s:g}s (last health check: {last})", self.log_tail()
                    )
                try:
                    timeout = aiohttp.ClientTimeout(total=max(0.05, min(2.0, left)))
                    async with session.get(url, timeout=timeout) as response:
                        if response.status == 200:
                            return
                        last = f"HTTP {response.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = type(exc).__name__  # not listening yet, mostly
                # Sleep, but wake at once if the process exits meanwhile.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._exited.wait(), min(interval_s, max(0.0, left)))

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace_s`; returns the return code. No exit callback
        is called for this exit."""
        if self._proc is None:
            return None
        self._stopping = True
        if not self._exited.is_set():
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._exited.wait(), grace_s)
            except TimeoutError:
                log.warning("engine %s did not stop within %gs: killing it", self.log_path.stem, grace_s)
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._exited.wait(), KILL_WAIT_S)
        self._signal_group(signal.SIGKILL)  # workers left behind by the leader, if any
        # Let the watcher finish (unless this is an exit callback calling stop(): it is the watcher).
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._watcher), KILL_WAIT_S)
        return self.returncode

    def log_tail(self, nbytes: int = LOG_TAIL_BYTES) -> str:
        """The end of this run's output."""
        try:
            with self.log_path.open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(self._log_from, size - nbytes))
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _exited_early(self) -> LaunchFailed:
        code = self.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return LaunchFailed(f"engine {how} before it was ready", self.log_tail(), code)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        # The group's id is the leader's pid (start_new_session). Once the group is empty the id is free
        # and ProcessLookupError says so; a live group keeps the id from being reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def _watch(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        self._exited.set()
        if self._stopping:
            return
        self._signal_group(signal.SIGKILL)  # its workers must not outlive it (they hold GPU memory)
        tail = self.log_tail()
        log.warning("engine %s exited on its own with %s", self.log_path.stem, code)
        for callback in self._callbacks:
            try:
                result = callback(code, tail)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("exit callback of engine %s failed", self.log_path.stem)
