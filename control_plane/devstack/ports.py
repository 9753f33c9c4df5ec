"""The local stack's simulator ports: those of the registry, or moved (free ones, or shifted), so that two
`make run` stacks can share a host.

The registry file stays the user's: when ports are moved, the control plane reads a mirror of it
(`<state dir>/models.local.yaml`) whose loopback endpoint URLs carry the moved ports, rewritten within half a
second of every edit. Anything that is not a readable registry (bad YAML, bytes that are not UTF-8) is
copied as it is, so the control plane refuses it with its own error and keeps the last good config.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import is_loopback

PortMap = Callable[[int], int]


def parse_sim_ports(spec: str) -> PortMap | None:
    """`registry` → None (no change); `auto` → a free port per registry port; `+N` → the port plus N."""
    spec = spec.strip()
    if spec in ("", "registry"):
        return None
    if spec == "auto":
        chosen: dict[int, int] = {}
        return lambda port: chosen.setdefault(port, free_port())
    if spec.startswith("+") and spec[1:].isdigit():
        offset = int(spec[1:])
        if not 0 < offset < 60000:
            raise ValueError(f"SIM_PORTS offset out of range: {spec}")

        def shifted(port: int) -> int:
            if port + offset > 65535:
                raise ValueError(f"port {port} + {offset} is past 65535")
            return port + offset

        return shifted
    raise ValueError(f"SIM_PORTS must be 'registry', 'auto' or '+N', not {spec!r}")


def _move(url: str, ports: PortMap) -> str:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return url
    if port is None or not is_loopback(parts.hostname or ""):
        return url
    host = parts.netloc.rsplit(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{host}:{ports(port)}"))


def _anchor(value: Any, base: Path | None) -> Any:
    """A relative path of the source file made absolute: the mirror lives elsewhere (the state dir)."""
    if base is None or not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    return str(base / value)


def _anchor_paths(doc: dict[str, Any], base: Path | None) -> None:
    lifecycle = doc.get("lifecycle")
    if isinstance(lifecycle, dict):
        for directory in lifecycle.get("model_dirs") or []:
            if isinstance(directory, dict) and "path" in directory:
                directory["path"] = _anchor(directory["path"], base)
        if "log_dir" in lifecycle:
            lifecycle["log_dir"] = _anchor(lifecycle["log_dir"], base)
    for model in doc.get("models") or []:
        launch = model.get("launch") if isinstance(model, dict) else None
        if isinstance(launch, dict) and "path" in launch:
            launch["path"] = _anchor(launch["path"], base)


def remap_registry(doc: Any, ports: PortMap, base: Path | None = None) -> Any:
    """The registry document with every loopback endpoint URL on its moved port, and its relative paths
    (model directories, weights) anchored at `base`, the source file's directory (other values as they
    are; an unexpected shape is returned unchanged for the loader to report)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models", []), list):
        return doc
    _anchor_paths(doc, base)
    for model in doc.get("models") or []:
        endpoints = model.get("endpoints") if isinstance(model, dict) else None
        for endpoint in endpoints if isinstance(endpoints, list) else []:
            if isinstance(endpoint, dict) and isinstance(endpoint.get("url"), str):
                endpoint["url"] = _move(endpoint["url"], ports)
    return doc


class RegistryMirror:
    """Keeps `target` equal to `source` with moved simulator ports."""

    def __init__(self, source: Path, target: Path, ports: PortMap) -> None:
        self.source = source
        self.target = target
        self._ports = ports
        self._digest = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> bool:
        """Rewrite the mirror if the source changed; True if it did."""
        try:
            raw = self.source.read_bytes()
        except OSError:
            return False
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return False
        out = raw
        with contextlib.suppress(UnicodeDecodeError, yaml.YAMLError, ValueError):
            doc = yaml.safe_load(raw.decode("utf-8"))
            if isinstance(doc, dict):
                header = f"# Generated from {self.source} with moved simulator ports: edit that file.\n"
                moved = remap_registry(doc, self._ports, self.source.resolve().parent)
                out = (header + yaml.safe_dump(moved, sort_keys=False)).encode()
        # Atomic: the control plane's watcher must never read half a file.
        tmp = self.target.with_name(self.target.name + ".tmp")
        tmp.write_bytes(out)
        os.replace(tmp, self.target)
        self._digest = digest
        return True

    def start(self, interval_s: float = 0.5) -> RegistryMirror:
        self.sync()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.sync()

        self._thread = threading.Thread(target=loop, name="registry-mirror", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
