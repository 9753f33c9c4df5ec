"""The control plane's core: registry + admin overlay + live inputs → gateway state → one snapshot per
connected Envoy.

A change (file reload or admin call) is checked before anything of it is kept: the effective registry
must validate, every snapshot must be consistent, Envoy's validate mode must accept clusters with
overrides; then it is pushed and the connected Envoys' verdict awaited. A NACK rolls it back (the admin
overlay is written only after the verdict), so no rejected change can block a later valid one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from google.protobuf import json_format

from control_plane.config.schema import Registry
from control_plane.errors import ConfigError, RejectedChangeError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.overload.publish import overload_changes
from control_plane.state import (
    EndpointState,
    GatewayState,
    Health,
    KeyEntry,
    LaunchedReplica,
    NodeParams,
    Resolver,
    StateInputs,
    build_state,
    resolve_host,
)
from control_plane.store.overlay import AdminStore, Applied, Flags
from control_plane.vetting import ClusterChecker, build_checked, envoy_problems, startup_config
from control_plane.xds.builders import build_snapshot
from control_plane.xds.builders.cluster import build_cluster
from control_plane.xds.builders.endpoint import build_load_assignment
from control_plane.xds.builders.keys import build_key_extension
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.envoy_check import cluster_problems
from control_plane.xds.resources import CLUSTER, ENDPOINT, EXTENSION_CONFIG
from control_plane.xds.snapshot import Snapshot, content_version
from control_plane.xds.sync import SyncReport, SyncWaiter

log = logging.getLogger(__name__)

RegistryLayer = Callable[[Registry], Registry]

RegistryListener = Callable[[Registry], Awaitable[None]]

LaunchedListener = Callable[[], None]


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
        sync_timeout_s: float = 3.0,
        allow_empty: bool = False,
        cluster_checker: ClusterChecker = cluster_problems,
        log_credential: str = "",
        layer: RegistryLayer | None = None,
    ) -> None:
        """Raises ConfigError if the registry file cannot be served (an invalid admin overlay is
        skipped with warnings instead, see vetting.startup_config). `layer` adds to every file registry
        before the admin overlay (the models found in model directories: lifecycle/registry_layer.py)."""
        self._layer: RegistryLayer = layer or (lambda r: r)
        self._file_registry = registry
        registry = self._layer(registry)
        self._store = store or AdminStore(":memory:")
        self._cache = cache
        self._metrics = metrics
        self._resolver = resolver
        self._inputs = StateInputs()
        self._nodes: dict[str, NodeParams] = {}
        self._streams: dict[str, int] = {}
        self._listeners: list[RegistryListener] = []
        self._launched_listeners: list[LaunchedListener] = []
        self._drain_started: dict[str, float] = {}
        self._assignments: dict[str, tuple[tuple[EndpointState, ...], ClusterLoadAssignment]] = {}
        self._allow_empty = allow_empty
        self._checker = cluster_checker
        self._log_credential = log_credential  # rendered into every node's listener (NodeParams)
        self._sync = SyncWaiter(cache, sync_timeout_s)
        # One change at a time, from its check to its verdict: each is judged against the one before.
        self._changes = asyncio.Lock()
        flags = self._store.flags()
        self._inputs.draining_endpoints, self._inputs.draining_models = (
            flags.draining_endpoints,
            flags.draining_models,
        )
        self._applied = startup_config(registry, self._store, resolver, self._inputs, cluster_checker)
        self._track_drains()
        self._state = build_state(self._applied.registry, resolver, self._inputs)
        # The clusters live now: a change has Envoy check only the clusters it alters.
        # Only the clusters are built here: the full snapshots are built when the Envoys connect.
        self._clusters: dict[str, Any] = {c.name: c for c in map(build_cluster, self._state.models)}
        self._previous = (self._applied, self._inputs)  # what a rejected change rolls back to

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

    def add_launched_listener(self, listener: LaunchedListener) -> None:
        """Called after a launched model's ready replicas changed (`inputs.launched`), on the plane's loop:
        health probes and Prometheus' file SD follow them."""
        self._launched_listeners.append(listener)

    def connected_nodes(self) -> dict[str, int]:
        return {node: count for node, count in self._streams.items() if count}

    async def wait_synced(
        self, timeout_s: float | None = None, changed: dict[str, frozenset[str]] | None = None
    ) -> SyncReport:
        """Wait (at most `timeout_s`, default the plane's bound) for the connected Envoys' verdict on
        the current config; nodes already known to lag are not waited for again."""
        return await self._sync.wait(lambda: list(self.connected_nodes()), changed, timeout_s)

    def node_sync(self, node: str) -> dict[str, Any]:
        """One Envoy's sync state (synced, lagging, last rejection) for /admin/status."""
        return self._sync.node_status(node)

    def drain_started(self, key: str) -> float | None:
        """Monotonic time a drain of `endpoint:<id>` or `model:<id>` began (this process's view)."""
        return self._drain_started.get(key)

    # NodeRegistry (called by the ADS transport)
    def node_connected(self, node: base_pb2.Node) -> str:
        metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        params = dataclasses.replace(NodeParams.from_metadata(metadata), log_credential=self._log_credential)
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
    async def apply_registry(self, registry: Registry, *, force_empty: bool = False) -> SyncReport:
        """Make `registry` the live file config. Refused (ConfigError, RejectedChangeError) with the
        previous config left live if it does not pass, or if it would remove every model and neither
        the file's `allow_empty`, `force_empty` nor the plane's `allow_empty` says so."""
        async with self._changes:
            applied = self._store.apply(self._layer(registry))
            forced = force_empty or registry.allow_empty or self._allow_empty
            if self.registry.models and not applied.registry.models and not forced:
                raise ConfigError(
                    "registry file",
                    [
                        "models: this change would remove every model (every request would get 404); "
                        "set `allow_empty: true` at the top level of the file if that is intended"
                    ],
                )
            report = await self._push_checked(applied, self._store.flags())
            self._file_registry = registry
            await self._committed()
            return report

    async def admin_change(self, write: Callable[[], None]) -> SyncReport:
        """Check, push and, once no Envoy rejected it, store an admin change.

        `write` makes the change in the store; it runs twice: first inside a preview that is undone
        (to see the registry it makes), then for real after the verdict. ConfigError if the result is
        invalid, RejectedChangeError if it cannot be served or an Envoy NACKed it (rolled back)."""
        async with self._changes:
            with self._store.preview():
                write()
                applied = self._store.apply(self._file_registry)
                flags = self._store.flags()
            report = await self._push_checked(applied, flags)
            try:
                write()
            except Exception:
                log.exception("admin change not stored; rolling its push back")
                await self._roll_back(self._previous)
                raise
            await self._committed()
            return report

    async def _push_checked(self, applied: Applied, flags: Flags) -> SyncReport:
        inputs = dataclasses.replace(
            self._inputs, draining_endpoints=flags.draining_endpoints, draining_models=flags.draining_models
        )
        state = await asyncio.to_thread(build_state, applied.registry, self._resolver, inputs)
        built = self._build_checked(state)
        problems = await asyncio.to_thread(
            envoy_problems, state, next(iter(built.values())), self._clusters, self._checker
        )
        if problems:
            raise RejectedChangeError(problems)
        self._previous = (self._applied, self._inputs)
        before = {n: dict(s.versions) for n in self._nodes if (s := self._cache.get_snapshot(n))}
        self._install(state, built)
        self._applied, self._inputs = applied, inputs
        changed = {
            node: frozenset(t for t, v in snapshot.versions.items() if before.get(node, {}).get(t) != v)
            for node in self._nodes
            if (snapshot := self._cache.get_snapshot(node)) is not None
        }
        report = await self.wait_synced(changed=changed)
        if report.rejected:
            await self._roll_back(self._previous)
            raise RejectedChangeError(
                [f"Envoy {n} rejected the change (rolled back): {m}" for n, m in report.rejected.items()]
            )
        return report

    async def _roll_back(self, previous: tuple[Applied, StateInputs]) -> None:
        """Back to the config before the change, with the health and weights known now."""
        applied, before = previous
        inputs = dataclasses.replace(
            self._inputs, draining_endpoints=before.draining_endpoints, draining_models=before.draining_models
        )
        state = await asyncio.to_thread(build_state, applied.registry, self._resolver, inputs)
        self._install(state, self._build_checked(state))
        self._applied, self._inputs = applied, inputs

    async def _committed(self) -> None:
        self._track_drains()
        for listener in self._listeners:
            await listener(self._applied.registry)

    def _build_checked(self, state: GatewayState) -> dict[NodeParams, Snapshot]:
        try:
            return build_checked(state, self._nodes.values(), self._build)
        except RejectedChangeError:
            self._metrics.snapshot_inconsistent.inc()
            raise

    def _install(self, state: GatewayState, built: dict[NodeParams, Snapshot]) -> None:
        """Make checked snapshots current for every node (all built first: no half-published change)."""
        self._state = state
        self._assignments.clear()
        self._clusters = dict(next(iter(built.values())).resources[CLUSTER])
        changed = sum(self._cache.set_snapshot(node, built[params]) for node, params in self._nodes.items())
        log.debug("gateway state published: %d models, %d Envoys updated", len(state.models), changed)

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

    async def reapply(self) -> SyncReport:
        """The layer's output changed (a model directory was rescanned): apply the file registry again."""
        return await self.apply_registry(self._file_registry)

    def set_activator(self, address: tuple[str, int] | None) -> None:
        """Where requests for a launched model with no ready replica go (the activator); before any Envoy
        connects, so the first snapshots have it."""
        self._inputs.activator = address
        self._republish()

    def set_launched(self, model_id: str, replicas: tuple[LaunchedReplica, ...]) -> None:
        """A launched model's ready replicas changed: only its endpoints (EDS) are pushed."""
        if self._inputs.launched.get(model_id, ()) == replicas:
            return
        launched = dict(self._inputs.launched)
        if replicas:
            launched[model_id] = replicas
        else:
            launched.pop(model_id, None)
        self._inputs.launched = launched
        self._republish()
        for listener in self._launched_listeners:
            listener()

    async def set_keys(self, keys: tuple[KeyEntry, ...]) -> SyncReport | None:
        """The API-key table changed: only the key check's ECDS resource is rebuilt and pushed (no
        listener or route update, so no connection is drained). None when nothing was pushed."""
        async with self._changes:
            if keys == self._inputs.keys:
                return None
            self._inputs.keys = keys
            self._state = dataclasses.replace(self._state, keys=keys)
            if self._state.auth_mode != "api_key":
                return None
            extension = build_key_extension(self._state)
            resources = {extension.name: extension}
            version = content_version(resources)
            replaced: dict[int, Snapshot] = {}  # nodes that shared a snapshot keep sharing one
            changed: dict[str, frozenset[str]] = {}
            for node in self._nodes:
                current = self._cache.get_snapshot(node)
                if current is None:
                    continue
                if id(current) not in replaced:
                    replaced[id(current)] = current.replacing(EXTENSION_CONFIG, resources, version)
                self._cache.set_snapshot(node, replaced[id(current)])
                changed[node] = frozenset({EXTENSION_CONFIG})
            return await self.wait_synced(changed=changed)

    def set_saturation(self, levels: dict[str, int]) -> None:
        """Saturated models changed (control_plane/overload): if the models to shed or the fallback
        switches changed, the routes (RDS) are pushed with the endpoints."""
        levels = {m: level for m, level in levels.items() if level > 0}
        if levels == self._inputs.saturation:
            return
        self._inputs.saturation = levels
        self._republish()

    def _republish(self) -> None:
        """Health and weights changed: only endpoint assignments differ, so only EDS is rebuilt (and the
        routes when the models to shed or a fallback switch changed: overload/publish.py)."""
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
        extra = overload_changes(self._state, state)
        snapshots: dict[str, Snapshot] = {}
        replaced: dict[int, Snapshot] = {}  # nodes that shared a snapshot share the new one (and its packing)
        for node, params in self._nodes.items():
            current = self._cache.get_snapshot(node)
            if current is None:
                snapshots[node] = self._build(state, params)
                continue
            if id(current) not in replaced:
                replaced[id(current)] = current.replacing(ENDPOINT, assignments, version)
                for type_url, (resources, type_version) in extra.items():
                    replaced[id(current)] = replaced[id(current)].replacing(type_url, resources, type_version)
            snapshots[node] = replaced[id(current)]
        self._metrics.snapshot_build_seconds.observe(time.perf_counter() - started)
        self._state = state
        for node, snapshot in snapshots.items():
            self._cache.set_snapshot(node, snapshot)
