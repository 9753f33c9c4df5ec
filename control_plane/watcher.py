"""Reload the registry file when it changes (polled) or on SIGHUP; a bad file keeps the last good config."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from control_plane.config.loader import load_registry
from control_plane.config.schema import Registry
from control_plane.errors import GatewayError
from control_plane.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigWatcher:
    """Never dies: each round catches whatever goes wrong, reports it (log, `last_error`, the reload
    counter's `error` result) and keeps watching."""

    def __init__(
        self,
        path: Path,
        apply: Callable[[Registry], Awaitable[object]],
        metrics: ControlPlaneMetrics,
        interval_s: float = 1.0,
        *,
        allow_empty: bool = False,
    ) -> None:
        self._path = path
        self._apply = apply
        self._metrics = metrics
        self._interval = interval_s
        self._allow_empty = allow_empty
        self._digest = _digest(path)
        self._wakeup = asyncio.Event()
        self.last_error: str | None = None

    def request_reload(self) -> None:
        self._wakeup.set()

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    async def reload(self) -> bool:
        """Load, validate and apply the file now. Returns whether the new config is live."""
        self._digest = _digest(self._path)
        try:
            registry = load_registry(self._path, allow_empty=self._allow_empty)
            await self._apply(registry)
        except GatewayError as exc:
            self.last_error = str(exc)
            self._metrics.config_reloads.labels("failure").inc()
            log.error("config reload refused, the last good config stays live:\n%s", exc)
            return False
        except Exception as exc:  # a bug, not a bad file: reported, and the watching goes on
            self.last_error = f"{self._path}: internal error while reloading ({type(exc).__name__}: {exc})"
            self._metrics.config_reloads.labels("error").inc()
            log.exception("config reload failed, the last good config stays live")
            return False
        self.last_error = None
        self._metrics.config_reloads.labels("success").inc()
        log.info("config reloaded from %s", self._path)
        return True

    async def run(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{self._path}: the file watcher hit {type(exc).__name__}: {exc}"
                self._metrics.config_reloads.labels("error").inc()
                log.exception("config watcher round failed; watching goes on")
                await asyncio.sleep(self._interval)  # no busy loop if it fails every time

    async def _round(self) -> None:
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=self._interval)
            forced = True
        except TimeoutError:
            forced = False
        self._wakeup.clear()
        if forced or _digest(self._path) != self._digest:
            await self.reload()
