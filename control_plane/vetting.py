"""Checks a candidate config passes before anything of it is pushed or stored: every snapshot consistent,
and Envoy's own verdict on the clusters whose `cluster_overrides` the schema cannot judge.

Also the start-up rule: a control plane never starts into a config it cannot serve. An invalid registry
file refuses the start (the operator fixes the file); admin overlay entries that no longer pass are
skipped with a warning, so a bad entry stored by an older version cannot take the gateway down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from envoy.config.cluster.v3 import cluster_pb2

from control_plane.config.schema import Registry
from control_plane.errors import ConfigError, InconsistentSnapshotError, RejectedChangeError
from control_plane.state import GatewayState, NodeParams, Resolver, StateInputs, build_state
from control_plane.store.overlay import AdminStore, Applied
from control_plane.xds.builders import build_snapshot
from control_plane.xds.envoy_check import cluster_problems
from control_plane.xds.resources import CLUSTER, cluster_name
from control_plane.xds.snapshot import Snapshot

log = logging.getLogger(__name__)

ClusterChecker = Callable[[list[cluster_pb2.Cluster]], dict[str, str]]
Builder = Callable[[GatewayState, NodeParams], Snapshot]


def build_checked(
    state: GatewayState, params: Iterable[NodeParams], build: Builder = build_snapshot
) -> dict[NodeParams, Snapshot]:
    """One consistent snapshot per node setting (at least the default one, so a change made while no
    Envoy is connected is checked too); RejectedChangeError naming the dangling references if not."""
    built: dict[NodeParams, Snapshot] = {}
    for node_params in set(params) or {NodeParams()}:
        snapshot = build(state, node_params)
        try:
            snapshot.check_consistent()  # remembered on the snapshot: the cache does not check again
        except InconsistentSnapshotError as exc:
            raise RejectedChangeError([f"inconsistent config: {p}" for p in exc.problems]) from None
        built[node_params] = snapshot
    return built


def envoy_problems(
    state: GatewayState,
    snapshot: Snapshot,
    current: Mapping[str, object],
    checker: ClusterChecker = cluster_problems,
) -> list[str]:
    """Envoy's objections to the clusters with `cluster_overrides` that are new or differ from
    `current` (the clusters live now): the generated part of a cluster is known good."""
    by_cluster = {cluster_name(m.id): m.id for m in state.models if m.config.cluster_overrides}
    clusters = snapshot.resources[CLUSTER]
    candidates = [
        c
        for name, c in clusters.items()
        if name in by_cluster and current.get(name) != c and isinstance(c, cluster_pb2.Cluster)
    ]
    if not candidates:
        return []
    return [
        f"model {by_cluster[name]!r}: cluster_overrides: Envoy refuses the cluster: {message}"
        for name, message in sorted(checker(candidates).items())
    ]


def _check(state: GatewayState, checker: ClusterChecker) -> list[str]:
    try:
        snapshot = next(iter(build_checked(state, ()).values()))
    except RejectedChangeError as exc:
        return exc.problems
    return envoy_problems(state, snapshot, {}, checker)


def startup_config(
    registry: Registry,
    store: AdminStore,
    resolver: Resolver,
    inputs: StateInputs,
    checker: ClusterChecker = cluster_problems,
) -> Applied:
    """The effective registry to start with: the file's with every admin entry that still passes.

    Raises ConfigError if the file itself cannot be served (the start is refused with its reasons)."""
    problems = _check(build_state(registry, resolver, inputs), checker)
    if problems:
        raise ConfigError("registry file", problems)
    try:
        applied = store.apply(registry)
    except ConfigError as exc:
        return _file_only(registry, [f"the admin changes make the registry invalid: {exc.problems}"])
    refused = _check(build_state(applied.registry, resolver, inputs), checker)
    if not refused:
        return applied
    # Find the admin-added models at fault and leave them out; anything else: the file alone.
    bad = {m for m in applied.admin_models if any(f"model {m!r}" in p for p in refused)}
    if bad:
        kept = tuple(m for m in applied.registry.models if m.id not in bad)
        trimmed = Applied(
            registry=applied.registry.model_copy(update={"models": kept}),
            warnings=[*applied.warnings, *(f"admin-added model skipped: {p}" for p in refused)],
            admin_models=applied.admin_models - bad,
            admin_endpoints=applied.admin_endpoints,
        )
        if not _check(build_state(trimmed.registry, resolver, inputs), checker):
            for warning in trimmed.warnings:
                log.warning("%s", warning)
            return trimmed
    return _file_only(registry, [f"the admin changes cannot be served: {p}" for p in refused])


def _file_only(registry: Registry, warnings: list[str]) -> Applied:
    warnings = [*warnings, "admin changes ignored: serving the registry file alone"]
    for warning in warnings:
        log.error("%s", warning)
    return Applied(registry=registry, warnings=warnings)
