"""Prometheus file-based service discovery of the model servers, from the registry.

`backend_targets` and `gpu_targets` are pure: registry in, file-SD groups out (one group per endpoint,
in registry order, so the output is stable). A launched model's ready replicas (control_plane/lifecycle)
are backend targets too, after the registry's endpoints, labelled like them; they come and go as models
load and unload, and the control plane rewrites the files each time.

`FileSdWriter` writes them where Prometheus' `file_sd_configs` read them, atomically (temporary file +
rename: Prometheus never reads half a file) and only when their content changed (no needless target
reloads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from control_plane.config.schema import Registry
from control_plane.lifecycle.targets import Launched, launched_endpoints

BACKENDS_FILE = "backends.json"
"""Engine /metrics of every endpoint (job `backends`)."""
GPU_FILE = "gpu.json"
"""Separate DCGM exporters, from endpoints' `gpu_metrics_url` (job `gpu`)."""

TargetGroup = dict[str, Any]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _labels(model_id: str, endpoint_id: str, engine: str) -> dict[str, str]:
    return {"model": model_id, "endpoint": endpoint_id, "engine": engine}


def backend_targets(registry: Registry, launched: Launched | None = None) -> list[TargetGroup]:
    """One group per endpoint: its `host:port` (scraped at `/metrics`) with labels model, endpoint, engine;
    then one per ready replica of a launched model (`launched`: the control plane's `inputs.launched`).

    Disabled models are included: their servers still run and their metrics still matter."""
    groups: list[TargetGroup] = []
    for model in registry.models:
        for index, endpoint in enumerate(model.endpoints):
            groups.append(
                {
                    "targets": [_address(endpoint.host, endpoint.port)],
                    "labels": _labels(model.id, model.endpoint_id(index), model.engine.value),
                }
            )
    for replica in launched_endpoints(registry, launched or {}):
        groups.append(
            {
                "targets": [_address(replica.replica.address, replica.replica.port)],
                "labels": _labels(replica.model.id, replica.id, replica.model.engine.value),
            }
        )
    return groups


def gpu_targets(registry: Registry) -> list[TargetGroup]:
    """One group per endpoint that names a separate DCGM exporter (`gpu_metrics_url`).

    The URL's path, scheme and query travel as `__metrics_path__`, `__scheme__` and `__param_<name>`, which
    Prometheus applies to the scrape; the labels are the same as the endpoint's backend target."""
    groups: list[TargetGroup] = []
    for model in registry.models:
        for index, endpoint in enumerate(model.endpoints):
            if not endpoint.gpu_metrics_url:
                continue
            parts = urlsplit(endpoint.gpu_metrics_url)
            if not parts.hostname:
                continue
            port = parts.port or (443 if parts.scheme == "https" else 80)
            labels: dict[str, str] = {
                **_labels(model.id, model.endpoint_id(index), model.engine.value),
                "__metrics_path__": parts.path or "/metrics",
                "__scheme__": parts.scheme or "http",
            }
            for name, value in parse_qsl(parts.query):
                labels[f"__param_{name}"] = value
            groups.append({"targets": [_address(parts.hostname, port)], "labels": labels})
    return groups


def render_groups(groups: list[TargetGroup]) -> str:
    """The file-SD JSON text of some groups (stable: sorted keys, two-space indent, final newline)."""
    return json.dumps(groups, indent=2, sort_keys=True) + "\n"


class FileSdWriter:
    """Keeps `<directory>/backends.json` and `<directory>/gpu.json` in step with a registry."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def backends_path(self) -> Path:
        return self.directory / BACKENDS_FILE

    @property
    def gpu_path(self) -> Path:
        return self.directory / GPU_FILE

    def write(self, registry: Registry, launched: Launched | None = None) -> bool:
        """Write both files if their content changed; True if at least one was rewritten.

        Both files always exist after a call (an empty list when there is nothing to scrape), so
        Prometheus never logs a missing file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        changed = _write_if_changed(self.backends_path, render_groups(backend_targets(registry, launched)))
        changed = _write_if_changed(self.gpu_path, render_groups(gpu_targets(registry))) or changed
        return changed


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    # The temporary name does not end in .json, so a `*.json` glob in file_sd_configs never matches it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True
