"""Snapshot cache keyed by Envoy node id, with change notification for the streams serving each node.

As in go-control-plane's `pkg/cache/v3`: the cache holds the latest consistent snapshot per node; the
transport decides what to send. An inconsistent snapshot is refused, so it can never be pushed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from control_plane.xds.resources import EXTENSION_CONFIG
from control_plane.xds.snapshot import Snapshot


@dataclass(frozen=True)
class Answer:
    """An Envoy's answer to one pushed version of a type: an ACK, or a NACK with Envoy's message."""

    version: str
    error: str | None = None


@dataclass(frozen=True)
class NodeVerdict:
    """Where a node stands with its current snapshot."""

    pending: frozenset[str] = frozenset()  # types whose current version it has not answered yet
    rejected: dict[str, Answer] = field(default_factory=dict)  # type → its NACK of the current version

    @property
    def synced(self) -> bool:
        return not self.pending


class SnapshotCache:
    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._answered: dict[str, dict[str, Answer]] = {}  # node → type URL → its last answer
        self._last_nack: dict[str, dict[str, Answer]] = {}  # node → type URL → its last NACK, kept
        self._answer_listeners: set[Callable[[], None]] = set()

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

    def record_answer(self, node_id: str, type_url: str, version: str, error: str | None = None) -> None:
        """An Envoy ACKed `version` of a type, or NACKed it with `error` (Envoy's error_detail)."""
        answer = Answer(version, error)
        self._answered.setdefault(node_id, {})[type_url] = answer
        if error is not None:
            self._last_nack.setdefault(node_id, {})[type_url] = answer
        for listener in list(self._answer_listeners):
            listener()

    def forget_answers(self, node_id: str) -> None:
        self._answered.pop(node_id, None)

    def verdict(self, node_id: str) -> NodeVerdict:
        """Which types of its current snapshot the node has not answered, and which it rejected."""
        snapshot = self._snapshots.get(node_id)
        if snapshot is None:
            return NodeVerdict()
        answered = self._answered.get(node_id, {})
        pending, rejected = set(), {}
        for type_url, version in snapshot.versions.items():
            if type_url == EXTENSION_CONFIG and not snapshot.resources[type_url]:
                continue  # no filter names one (API keys off): no Envoy subscribes, none answers
            answer = answered.get(type_url)
            if answer is None or answer.version != version:
                pending.add(type_url)
            elif answer.error is not None:
                rejected[type_url] = answer
        return NodeVerdict(pending=frozenset(pending), rejected=rejected)

    def synced(self, node_id: str) -> bool:
        """Whether the node has answered (ACK or NACK) the current version of every type."""
        return node_id in self._snapshots and self.verdict(node_id).synced

    def last_nacks(self, node_id: str) -> dict[str, Answer]:
        """The last version of each type the node rejected, with Envoy's message (kept after later ACKs,
        for the status page)."""
        return dict(self._last_nack.get(node_id, {}))

    def add_answer_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` (synchronously, it must not block) after every ACK or NACK of any node."""
        self._answer_listeners.add(listener)

    @contextmanager
    def listen_answers(self, listener: Callable[[], None]) -> Iterator[None]:
        """As add_answer_listener, for the duration of the block."""
        self._answer_listeners.add(listener)
        try:
            yield
        finally:
            self._answer_listeners.discard(listener)

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
