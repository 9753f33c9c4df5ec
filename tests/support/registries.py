"""Registry documents used across tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def model(
    model_id: str, engine: str, ports: list[int], aliases: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": model_id,
        "engine": engine,
        # No explicit ids: the registry's default, `<model id>-<index>`, is what tests refer to.
        "endpoints": [{"url": f"http://127.0.0.1:{port}"} for port in ports],
    }
    if aliases:
        doc["aliases"] = aliases
    doc.update(extra)
    return doc


def registry(*models: dict[str, Any], **gateway: Any) -> dict[str, Any]:
    return {"gateway": {"expose_upstream_host": True, **gateway}, "models": list(models)}


def write(path: Path, doc: dict[str, Any]) -> Path:
    # Write then rename, so the control plane's file watcher never reads half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return path
