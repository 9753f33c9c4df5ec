"""Audit entries of registry-file reloads: what a reload changed, with the actor `registry-file`.

Admin calls and alert actions are audited where they write (`AdminStore.write`, actor from the request
or the alert); a file reload writes nothing to the store, so this wrapper around the watcher's apply
records one entry per applied reload, saying which models it added, removed, enabled or disabled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from control_plane.config.schema import Registry
from control_plane.service import ControlPlane
from control_plane.store.overlay import acting_as

FILE_ACTOR = "registry-file"


def registry_changes(before: Registry, after: Registry) -> str:
    """A one-line summary of what changed between two effective registries ("" when nothing did)."""
    old = {m.id: m for m in before.models}
    new = {m.id: m for m in after.models}
    parts = []
    for label, names in (
        ("added", sorted(new.keys() - old.keys())),
        ("removed", sorted(old.keys() - new.keys())),
        ("changed", sorted(i for i in old.keys() & new.keys() if old[i] != new[i])),
        ("disabled", sorted(i for i in old.keys() & new.keys() if old[i].enabled and not new[i].enabled)),
        ("enabled", sorted(i for i in old.keys() & new.keys() if not old[i].enabled and new[i].enabled)),
    ):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return "; ".join(parts)


def audited_file_reload(plane: ControlPlane, path: Path) -> Callable[..., Awaitable[None]]:
    """The watcher's apply callback: `plane.apply_registry`, then an audit entry if it went through
    (a refused file raises before anything is recorded; the watcher reports it). Other arguments
    are passed on to `apply_registry`."""

    async def apply(registry: Registry, *args: Any, **kwargs: Any) -> None:
        before = plane.registry
        with acting_as(FILE_ACTOR):
            await plane.apply_registry(registry, *args, **kwargs)
            changes = registry_changes(before, plane.registry)
            plane.store.write([], "registry.reload", str(path), changes or "no model changed")

    return apply
