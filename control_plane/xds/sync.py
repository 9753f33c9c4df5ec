"""Waiting for the connected Envoys' verdict on a pushed change: who ACKed it, who NACKed it (with
Envoy's message), who has not answered in time (lagging).

A node that did not answer within the bound is remembered as lagging: later waits do not wait for it
again (the others' calls return as soon as the healthy nodes answered) until it has caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import SHORT_NAMES

NO_ENVOY = "no Envoy is connected; the change is stored and will be sent when one connects"
NOT_CONFIRMED = "no connected Envoy confirmed the change in time; lagging ones get it when they catch up"


@dataclass(frozen=True)
class SyncReport:
    """The connected Envoys' verdict on the config current when the wait ended."""

    applied_to: tuple[str, ...] = ()  # ACKed every type
    rejected: Mapping[str, str] = field(default_factory=dict)  # node → Envoy's message (NACK)
    lagging: tuple[str, ...] = ()  # connected, but no answer within the bound
    warning: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The `sync` object of every admin write response (one shape for all of them)."""
        return {
            "applied_to": list(self.applied_to),
            "lagging": list(self.lagging),
            "rejected": dict(self.rejected),
            "warning": self.warning,
        }


class SyncWaiter:
    def __init__(self, cache: SnapshotCache, timeout_s: float = 3.0) -> None:
        self._cache = cache
        self.timeout_s = timeout_s
        self._lagging: set[str] = set()
        cache.add_answer_listener(self._caught_up)

    def _caught_up(self) -> None:
        # A lagging node that has answered everything it was sent is waited for again from now on.
        self._lagging = {n for n in self._lagging if not self._cache.verdict(n).synced}

    def is_lagging(self, node: str) -> bool:
        return node in self._lagging and not self._cache.verdict(node).synced

    async def wait(
        self,
        nodes: Callable[[], list[str]],
        changed: Mapping[str, frozenset[str]] | None = None,
        timeout_s: float | None = None,
    ) -> SyncReport:
        """Wait until every connected node not known to lag has answered its current snapshot (or
        rejected part of it), at most `timeout_s`.

        `changed` (node → type URLs the change altered) limits rejections to those types: a NACK of a
        version older than the change is not this change's fault. Without it, every rejection counts.
        """
        connected = nodes()
        if not connected:
            return SyncReport(warning=NO_ENVOY)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        woken = asyncio.Event()

        def rejections(node: str) -> dict[str, str]:
            verdict = self._cache.verdict(node)
            relevant = changed.get(node, frozenset()) if changed is not None else None
            return {
                SHORT_NAMES[t]: answer.error or ""
                for t, answer in verdict.rejected.items()
                if relevant is None or t in relevant
            }

        def done(node: str) -> bool:
            return self._cache.verdict(node).synced or bool(rejections(node))

        with self._cache.listen_answers(woken.set):
            while True:
                connected = nodes()
                waiting = [n for n in connected if n not in self._lagging and not done(n)]
                remaining = deadline - loop.time()
                if not waiting or remaining <= 0:
                    break
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), timeout=remaining)
        applied, rejected, lagging = [], {}, []
        for node in sorted(connected):
            refused = rejections(node)
            if refused:
                rejected[node] = "; ".join(f"{kind}: {message}" for kind, message in sorted(refused.items()))
            elif self._cache.verdict(node).synced:
                applied.append(node)
            else:
                lagging.append(node)
        self._lagging.update(lagging)
        warning = NOT_CONFIRMED if lagging and not applied and not rejected else None
        return SyncReport(tuple(applied), rejected, tuple(lagging), warning)

    def node_status(self, node: str) -> dict[str, Any]:
        """One Envoy's sync state for /admin/status."""
        verdict = self._cache.verdict(node)
        return {
            "synced": verdict.synced and not verdict.rejected,
            "lagging": self.is_lagging(node),
            "waiting_for": sorted(SHORT_NAMES[t] for t in verdict.pending),
            "last_rejected": {
                SHORT_NAMES[t]: {"version": a.version, "message": a.error}
                for t, a in sorted(self._cache.last_nacks(node).items())
            },
        }
