"""File reloads are audited with the actor `registry-file`, saying what they changed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from control_plane.admin.audit import audited_file_reload, registry_changes
from control_plane.config import parse_registry
from control_plane.config.schema import Registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.xds.cache import SnapshotCache

pytestmark = pytest.mark.unit


def _registry(*models: tuple[str, bool]) -> Registry:
    return parse_registry(
        {
            "models": [
                {
                    "id": name,
                    "engine": "vllm",
                    "enabled": enabled,
                    "endpoints": [{"url": f"http://127.0.0.1:{9000 + i}"}],
                }
                for i, (name, enabled) in enumerate(models)
            ]
        }
    )


def test_registry_changes_summarise_models() -> None:
    before = _registry(("a", True), ("b", True), ("c", False))
    after = _registry(("a", False), ("c", True), ("d", True))
    assert registry_changes(before, after) == ("added: d; removed: b; changed: a, c; disabled: a; enabled: c")
    assert registry_changes(before, before) == ""


def test_a_file_reload_is_audited_with_its_actor(tmp_path: Path) -> None:
    plane = ControlPlane(
        _registry(("a", True), ("b", True)),
        cache=SnapshotCache(),
        metrics=ControlPlaneMetrics.create(),
        resolver=lambda host: host,
    )
    apply: Any = audited_file_reload(plane, tmp_path / "models.yaml")
    asyncio.run(apply(_registry(("a", False), ("b", True))))
    entry = plane.store.audit(1)[0]
    assert entry["action"] == "registry.reload" and entry["actor"] == "registry-file"
    assert entry["target"] == str(tmp_path / "models.yaml")
    assert entry["detail"] == "changed: a; disabled: a"
    assert not plane.registry.model("a").enabled  # type: ignore[union-attr]
