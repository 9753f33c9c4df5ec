"""The control plane's core: registry + live inputs → gateway state → one snapshot per connected Envoy."""

from __future__ import annotations

import asyncio
import logging
import time

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from control_plane.config.schema import Registry
from control_plane.errors import InconsistentSnapshotError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.state import GatewayState, NodeParams, Resolver, StateInputs, build_state, resolve_host
from control_plane.xds.builders import build_snapshot
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.snapshot import Snapshot

log = logging.getLogger(__name__)


class ControlPlane:
    """Owns the last good registry and keeps every known Envoy's snapshot in step with it."""

    def __init__(
        self,
        registry: Registry,
        *,
        cache: SnapshotCache,
        metrics: ControlPlaneMetrics,
        resolver: Resolver = resolve_host,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._metrics = metrics
        self._resolver = resolver
        self._inputs = StateInputs()
        self._nodes: dict[str, NodeParams] = {}
        self._streams: dict[str, int] = {}
        self._state = build_state(registry, resolver, self._inputs)

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def state(self) -> GatewayState:
        return self._state

    @property
    def cache(self) -> SnapshotCache:
        return self._cache

    def connected_nodes(self) -> dict[str, int]:
        return {node: count for node, count in self._streams.items() if count}

    # NodeRegistry (called by the ADS transport)
    def node_connected(self, node: base_pb2.Node) -> str:
        metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        params = NodeParams.from_metadata(metadata)
        if self._nodes.get(node.id) != params or self._cache.get_snapshot(node.id) is None:
            self._nodes[node.id] = params
            self._cache.set_snapshot(node.id, self._build(self._state, params))
        self._streams[node.id] = self._streams.get(node.id, 0) + 1
        return node.id

    def node_disconnected(self, node_key: str) -> None:
        # The snapshot stays: the Envoy will be back, and its reconnect must be answered at once.
        self._streams[node_key] = max(0, self._streams.get(node_key, 0) - 1)

    def _build(self, state: GatewayState, params: NodeParams) -> Snapshot:
        started = time.perf_counter()
        snapshot = build_snapshot(state, params)
        self._metrics.snapshot_build_seconds.observe(time.perf_counter() - started)
        return snapshot

    async def apply_registry(self, registry: Registry) -> None:
        """Make `registry` the live config. On any error the previous config stays live, untouched."""
        state = await asyncio.to_thread(build_state, registry, self._resolver, self._inputs)
        self._publish(state)
        self._registry = registry

    def _publish(self, state: GatewayState) -> None:
        # Build every node's snapshot first, so that a failure leaves all Envoys on the old config.
        built: dict[NodeParams, Snapshot] = {}
        for params in set(self._nodes.values()):
            snapshot = self._build(state, params)
            problems = snapshot.consistency_problems()
            if problems:
                self._metrics.snapshot_inconsistent.inc()
                raise InconsistentSnapshotError(problems)
            built[params] = snapshot
        self._state = state
        changed = sum(self._cache.set_snapshot(node, built[params]) for node, params in self._nodes.items())
        log.info("gateway state published: %d models, %d Envoys updated", len(state.models), changed)
