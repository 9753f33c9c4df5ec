"""Snapshot cache keyed by Envoy node id, with change notification for the streams serving each node.

As in go-control-plane's `pkg/cache/v3`: the cache holds the latest consistent snapshot per node; the
transport decides what to send. An inconsistent snapshot is refused, so it can never be pushed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from control_plane.xds.snapshot import Snapshot


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._answered: dict[str, dict[str, str]] = {}  # node → type URL → last version ACKed or NACKed

    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> bool:
        """Store the snapshot if it differs from the current one; True when watchers were notified.

        Raises InconsistentSnapshotError (and keeps the old snapshot) if it is not consistent.
        """
        snapshot.check_consistent()
        current = self._snapshots.get(node_id)
        if current is not None and current.version == snapshot.version:
            return False
        self._snapshots[node_id] = snapshot
        for notify in list(self._watchers.get(node_id, ())):
            notify()
        return True

    def record_answer(self, node_id: str, type_url: str, version: str) -> None:
        """An Envoy ACKed or NACKed `version` of a type: it has dealt with it, one way or the other."""
        self._answered.setdefault(node_id, {})[type_url] = version

    def forget_answers(self, node_id: str) -> None:
        self._answered.pop(node_id, None)

    def synced(self, node_id: str) -> bool:
        """Whether the node has answered the current version of every type of its snapshot."""
        snapshot = self._snapshots.get(node_id)
        answered = self._answered.get(node_id, {})
        return snapshot is not None and all(answered.get(t) == v for t, v in snapshot.versions.items())

    def get_snapshot(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def node_ids(self) -> list[str]:
        return list(self._snapshots)

    def clear(self, node_id: str) -> None:
        self._snapshots.pop(node_id, None)

    @contextmanager
    def watch(self, node_id: str, notify: Callable[[], None]) -> Iterator[None]:
        """Call `notify` (synchronously, it must not block) whenever the node's snapshot changes."""
        self._watchers.setdefault(node_id, set()).add(notify)
        try:
            yield
        finally:
            watchers = self._watchers.get(node_id)
            if watchers is not None:
                watchers.discard(notify)
                if not watchers:
                    del self._watchers[node_id]
