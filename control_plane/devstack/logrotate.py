"""Size-based rotation of the local stack's Envoy access logs.

Envoy appends to its access log file and never rotates it. Rotation here: when a file reaches `max_bytes`,
rename it to `<name>.1` (older ones shift to `.2` ... `.<keep>`, the oldest is deleted), then
`POST /reopen_logs` to that Envoy's admin, which makes it reopen the path (a new, empty file). Lines
Envoy writes between the rename and the reopen land at the end of `<name>.1`: none is lost.

Production deployments can use logrotate(8) the same way (`postrotate`: curl -X POST .../reopen_logs).
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 5


@dataclass(frozen=True)
class RotationPolicy:
    max_bytes: int = DEFAULT_MAX_BYTES
    keep: int = DEFAULT_KEEP  # rotated files kept besides the live one

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.keep < 1:
            raise ValueError("max_bytes and keep must be at least 1")


def rotated_name(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def shift(path: Path, keep: int) -> None:
    """`path` → `path.1`, `path.1` → `path.2`, ...; what would become `path.<keep+1>` is deleted."""
    rotated_name(path, keep).unlink(missing_ok=True)
    for index in range(keep - 1, 0, -1):
        older = rotated_name(path, index)
        if older.exists():
            older.replace(rotated_name(path, index + 1))
    path.replace(rotated_name(path, 1))


def reopen_logs(admin_url: str, timeout_s: float = 5.0) -> None:
    """Tell an Envoy to reopen its access log files (its admin `POST /reopen_logs`)."""
    request = urllib.request.Request(f"{admin_url}/reopen_logs", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


# (access log path, admin URL of the Envoy writing it)
Targets = Callable[[], Iterable[tuple[Path, str]]]


class AccessLogRotator:
    """Call `check()` from a loop: at most every `interval_s` it stats each file and rotates the full ones."""

    def __init__(
        self,
        targets: Targets,
        policy: RotationPolicy | None = None,
        *,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._targets = targets
        self.policy = policy or RotationPolicy()
        self._interval_s = interval_s
        self._clock = clock
        self._next_at = 0.0

    def check(self) -> list[Path]:
        """Rotate every file at or over the size limit; returns the paths rotated."""
        now = self._clock()
        if now < self._next_at:
            return []
        self._next_at = now + self._interval_s
        rotated = []
        for path, admin_url in self._targets():
            try:
                if path.stat().st_size < self.policy.max_bytes:
                    continue
                shift(path, self.policy.keep)
            except FileNotFoundError:
                continue  # not written yet (no request so far)
            except OSError as exc:
                log.warning("access log %s: rotation failed: %s", path, exc)
                continue
            try:
                reopen_logs(admin_url)
            except (urllib.error.URLError, OSError) as exc:
                # Envoy keeps writing to the renamed file; the next check retries once it grows again.
                log.warning(
                    "access log %s rotated, but Envoy at %s did not reopen it: %s", path, admin_url, exc
                )
            rotated.append(path)
        return rotated
