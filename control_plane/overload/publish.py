"""What a health or saturation change adds to an endpoint (EDS) push: the route table (RDS), when the
models to shed or the fallback switches changed. Pure: two states in, the resources to replace out (with
their version, computed once for every node)."""

from __future__ import annotations

from control_plane.state import GatewayState
from control_plane.xds.builders.route import build_route_configuration
from control_plane.xds.builders.shedding import shed_levels
from control_plane.xds.resources import ROUTE
from control_plane.xds.snapshot import Resources, content_version


def overload_changes(before: GatewayState, after: GatewayState) -> dict[str, tuple[Resources, str]]:
    """Type URL → (resources, version) to replace in every node's snapshot; empty when neither the
    shedding levels nor the fallback switches changed."""
    if before.fallbacks == after.fallbacks and shed_levels(before) == shed_levels(after):
        return {}
    route = build_route_configuration(after)
    routes = {route.name: route}
    return {ROUTE: (routes, content_version(routes))}
