"""Pure builders: typed gateway state in, Envoy protobuf resources out. No I/O, no clocks, no globals."""

from __future__ import annotations

from control_plane.state import GatewayState, NodeParams
from control_plane.xds.builders.cluster import build_cluster
from control_plane.xds.builders.endpoint import build_load_assignment
from control_plane.xds.builders.keys import build_key_extension
from control_plane.xds.builders.listener import build_listener
from control_plane.xds.builders.route import build_route_configuration
from control_plane.xds.resources import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE
from control_plane.xds.snapshot import Snapshot


def build_snapshot(state: GatewayState, node: NodeParams) -> Snapshot:
    clusters = [build_cluster(m) for m in state.models]
    assignments = [build_load_assignment(m) for m in state.models]
    route = build_route_configuration(state)
    listener = build_listener(state.settings, node, state.auth_mode)
    extensions = {}
    if state.auth_mode == "api_key":
        extension = build_key_extension(state)
        extensions[extension.name] = extension
    return Snapshot.create(
        {
            CLUSTER: {c.name: c for c in clusters},
            ENDPOINT: {a.cluster_name: a for a in assignments},
            EXTENSION_CONFIG: extensions,
            LISTENER: {listener.name: listener},
            ROUTE: {route.name: route},
        }
    )


__all__ = ["build_snapshot"]
