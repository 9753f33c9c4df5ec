"""The control plane's core: registry + admin overlay + live inputs → gateway state → one snapshot per
connected Envoy."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from google.protobuf import json_format

from control_plane.config.schema import Registry
from control_plane.errors import InconsistentSnapshotError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.state import (
    EndpointState,
    GatewayState,
    Health,
    NodeParams,
    Resolver,
    StateInputs,
    build_state,
    resolve_host,
)
from control_plane.store.overlay import AdminStore, Applied
from control_plane.xds.builders import build_snapshot
from control_plane.xds.builders.endpoint import build_load_assignment
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import ENDPOINT
from control_plane.xds.snapshot import Snapshot, content_version

log = logging.getLogger(__name__)

RegistryListener = Callable[[Registry], Awaitable[None]]


class ControlPlane:
    """Owns the last good registry and keeps every known Envoy's snapshot in step with it."""

    def __init__(
        self,
        registry: Registry,
        *,
        cache: SnapshotCache,
        metrics: ControlPlaneMetrics,
        store: AdminStore | None = None,
        resolver: Resolver = resolve_host,
    ) -> None:
        self._file_registry = registry
        self._store = store or AdminStore(":memory:")
        self._cache = cache
        self._metrics = metrics
        self._resolver = resolver
        self._inputs = StateInputs()
        self._nodes: dict[str, NodeParams] = {}
        self._streams: dict[str, int] = {}
        self._listeners: list[RegistryListener] = []
        self._drain_started: dict[str, float] = {}
        self._assignments: dict[str, tuple[tuple[EndpointState, ...], ClusterLoadAssignment]] = {}
        self._applied = self._store.apply(registry)
        flags = self._store.flags()
        self._inputs.draining_endpoints, self._inputs.draining_models = (
            flags.draining_endpoints,
            flags.draining_models,
        )
        self._track_drains()
        self._state = build_state(self._applied.registry, resolver, self._inputs)

    @property
    def registry(self) -> Registry:
        """The effective registry: the file's with the admin changes applied."""
        return self._applied.registry

    @property
    def applied(self) -> Applied:
        return self._applied

    @property
    def store(self) -> AdminStore:
        return self._store

    @property
    def state(self) -> GatewayState:
        return self._state

    @property
    def cache(self) -> SnapshotCache:
        return self._cache

    @property
    def inputs(self) -> StateInputs:
        return self._inputs

    def add_registry_listener(self, listener: RegistryListener) -> None:
        """Called with the effective registry after every change (health probes, telemetry follow it)."""
        self._listeners.append(listener)

    def connected_nodes(self) -> dict[str, int]:
        return {node: count for node, count in self._streams.items() if count}

    async def wait_synced(self, timeout_s: float = 3.0) -> bool:
        """Wait until every connected Envoy has ACKed (or NACKed) the current config; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._cache.synced(node) for node in self.connected_nodes()):
                return True
            await asyncio.sleep(0.01)
        return False

    def drain_started(self, key: str) -> float | None:
        """Monotonic time a drain of `endpoint:<id>` or `model:<id>` began (this process's view)."""
        return self._drain_started.get(key)

    # NodeRegistry (called by the ADS transport)
    def node_connected(self, node: base_pb2.Node) -> str:
        metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        params = NodeParams.from_metadata(metadata)
        if self._nodes.get(node.id) != params or self._cache.get_snapshot(node.id) is None:
            # A node like one already connected gets the very same snapshot object: built, checked and
            # packed for the wire once for all of them.
            twin = next((n for n, p in self._nodes.items() if p == params and n != node.id), None)
            snapshot = self._cache.get_snapshot(twin) if twin is not None else None
            self._nodes[node.id] = params
            self._cache.set_snapshot(node.id, snapshot or self._build(self._state, params))
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

    # Changes
    async def apply_registry(self, registry: Registry) -> None:
        """Make `registry` the live file config. On any error the previous config stays live, untouched."""
        applied = self._store.apply(registry)
        await self._apply(applied)
        self._file_registry = registry

    async def refresh(self) -> None:
        """Re-read the admin overlay (after an admin change) and publish the result at once."""
        await self._apply(self._store.apply(self._file_registry))

    def candidate(self) -> Applied:
        """What the effective registry would be now (raises ConfigError if the overlay makes it invalid)."""
        return self._store.apply(self._file_registry)

    async def _apply(self, applied: Applied) -> None:
        flags = self._store.flags()
        inputs = dataclasses.replace(
            self._inputs, draining_endpoints=flags.draining_endpoints, draining_models=flags.draining_models
        )
        state = await asyncio.to_thread(build_state, applied.registry, self._resolver, inputs)
        self._publish(state)  # raises before changing anything if the result is unusable
        self._inputs, self._applied = inputs, applied
        self._track_drains()
        for listener in self._listeners:
            await listener(applied.registry)

    def _track_drains(self) -> None:
        now = time.monotonic()
        draining = {f"endpoint:{e}" for e in self._inputs.draining_endpoints}
        draining |= {f"model:{m}" for m in self._inputs.draining_models}
        for key in draining:
            self._drain_started.setdefault(key, now)
        for key in set(self._drain_started) - draining:
            del self._drain_started[key]

    def set_health(self, endpoint_id: str, health: Health) -> None:
        """A probe result changed an endpoint's health: publish at once."""
        if self._inputs.health.get(endpoint_id) == health:
            return
        self._inputs.health[endpoint_id] = health
        self._republish()

    def set_weights(self, weights: dict[str, int]) -> None:
        if weights == self._inputs.weights:
            return
        self._inputs.weights = dict(weights)
        self._republish()

    def _republish(self) -> None:
        """Health and weights changed: only endpoint assignments differ, so only EDS is rebuilt."""
        # Addresses were resolved when the registry was applied; reuse them instead of resolving again.
        addresses = {e.id: e.address for m in self._state.models for e in m.endpoints}
        state = build_state(self.registry, self._resolver, self._inputs, addresses)
        started = time.perf_counter()
        assignments = {}
        for model in state.models:
            # A model whose endpoints did not change keeps its assignment message as it is.
            cached = self._assignments.get(model.id)
            if cached is None or cached[0] != model.endpoints:
                cached = (model.endpoints, build_load_assignment(model))
                self._assignments[model.id] = cached
            assignments[cached[1].cluster_name] = cached[1]
        version = content_version(assignments)  # once, not per node
        snapshots: dict[str, Snapshot] = {}
        replaced: dict[int, Snapshot] = {}  # nodes that shared a snapshot share the new one (and its packing)
        for node, params in self._nodes.items():
            current = self._cache.get_snapshot(node)
            if current is None:
                snapshots[node] = self._build(state, params)
                continue
            if id(current) not in replaced:
                replaced[id(current)] = current.replacing(ENDPOINT, assignments, version)
            snapshots[node] = replaced[id(current)]
        self._metrics.snapshot_build_seconds.observe(time.perf_counter() - started)
        self._state = state
        for node, snapshot in snapshots.items():
            self._cache.set_snapshot(node, snapshot)

    def _publish(self, state: GatewayState) -> None:
        # Build every node's snapshot first, so that a failure leaves all Envoys on the old config.
        built: dict[NodeParams, Snapshot] = {}
        for params in set(self._nodes.values()):
            snapshot = self._build(state, params)
            try:
                snapshot.check_consistent()  # remembered on the snapshot: the cache does not check again
            except InconsistentSnapshotError:
                self._metrics.snapshot_inconsistent.inc()
                raise
            built[params] = snapshot
        self._state = state
        changed = sum(self._cache.set_snapshot(node, built[params]) for node, params in self._nodes.items())
        log.debug("gateway state published: %d models, %d Envoys updated", len(state.models), changed)
