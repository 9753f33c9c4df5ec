"""Child processes started in their own session, stopped by PID, with their output in a log file."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from control_plane.secret_files import private_dir

# Ports handed out by free_port in this process: never handed out twice, so two stacks of one test run
# cannot be given the same port between the pick and the bind.
_GIVEN: set[int] = set()
# Below the kernel's ephemeral range (32768-60999 by default): a port picked there can be taken by any
# outgoing connection between the pick and the bind, which a test with many clients makes likely.
_PICK_RANGE = (20_000, 32_000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, outside the ephemeral range, and not handed out before by this process."""
    for _ in range(1000):
        port = random.randrange(*_PICK_RANGE)
        if port in _GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {_PICK_RANGE} on {host}")


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= int(response.status) < 300
    except (OSError, urllib.error.URLError):
        return False


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self.ready_from = 0  # log offset where the current run's output begins (see wait_for_line)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def start(self) -> ManagedProcess:
        """Start (or start again, appending to the same log) the process."""
        # Logs may hold what a process prints about its secrets: private to the user (0700 / 0600).
        private_dir(self.log_path.parent)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a log left by an older run may have been world-readable
        with os.fdopen(fd, "ab") as log:
            # A session of its own: a Ctrl-C in the terminal reaches only the supervisor, which then stops
            # every child by PID in order; and a shell's exit cannot take the child with it.
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset `since` on (see log_size)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(since)
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def wait_for_line(self, pattern: str, timeout_s: float = 30.0, since: int = 0) -> re.Match[str]:
        """Wait until the process logs a line matching `pattern` (after byte `since`: a restarted process
        appends to its old log); fail early if it exits."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = regex.search(self.log_text(since))
            if match:
                return match
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.returncode()}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(
            f"{self.name} did not log {pattern!r} within {timeout_s:.0f}s:\n{self.log_text()[-3000:]}"
        )

    def signal(self, sig: int) -> None:
        if self.alive() and self._popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would; no cleanup in the child."""
        self.signal(signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self._popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self._popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
