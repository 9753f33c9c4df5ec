"""A reserve for high priority: Envoy's per-priority circuit breakers, for models that set
`overload.reserve_for_high`.

Shedding (shedding.py) reacts to the engines' telemetry, so it lags a scrape interval and a push behind;
a burst of low-priority requests can fill every batch slot meanwhile, and high-priority requests then wait
in the engines' queues. A reserve is immediate: the model's cluster lets requests of Envoy's DEFAULT
routing priority hold at most `limits.max_concurrent_requests - reserve_for_high` in flight (beyond: 503
`model_overloaded` at once, never retried), while HIGH has its own thresholds, up to the whole limit. So
the engines keep free slots for high priority whatever the others send.

Envoy's routing priority belongs to the route, so such a model gets a second route per name, ahead of its
own, for high-priority requests: without API keys, those whose priority header (when the registry allows
it) says `high`; with keys, those whose key is `high` (the key check writes it into metadata after the
route was chosen, so the shedding filter, entered on these models' routes, has Envoy choose again for a
high key: `reroute_high`).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.type.matcher.v3 import metadata_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2, struct_pb2

from control_plane.state import GatewayState, ModelState
from control_plane.xds.builders._common import uint32
from control_plane.xds.builders.shedding import SHED_CODE_NAME, SHED_FILTER_NAME
from control_plane.xds.resources import METADATA_NAMESPACE, model_route_client_name

HIGH_ROUTE_PREFIX = "high:"


def reserve_of(model: ModelState) -> int:
    return model.config.overload.reserve_for_high if model.config.overload else 0


def apply_priority_reserve(cluster: cluster_pb2.Cluster, model: ModelState) -> cluster_pb2.Cluster:
    """The cluster with DEFAULT thresholds lowered by the reserve and HIGH thresholds of its own."""
    reserve = reserve_of(model)
    if not reserve or not cluster.circuit_breakers.thresholds:
        return cluster
    out = cluster_pb2.Cluster()
    out.CopyFrom(cluster)
    default = out.circuit_breakers.thresholds[0]
    high = circuit_breaker_pb2.CircuitBreakers.Thresholds()
    high.CopyFrom(default)
    high.priority = base_pb2.RoutingPriority.HIGH
    others = model.config.limits.max_concurrent_requests - reserve
    # HTTP/1.1 upstreams carry one request per connection, and each priority has its own pool.
    default.max_requests.CopyFrom(uint32(others))
    default.max_connections.CopyFrom(uint32(others))
    out.circuit_breakers.thresholds.append(high)
    return out


def _is_high(state: GatewayState) -> tuple[list[rc.HeaderMatcher], list[metadata_pb2.MetadataMatcher]]:
    if state.auth_mode == "api_key":
        key_priority = metadata_pb2.MetadataMatcher(
            filter=METADATA_NAMESPACE,
            path=[
                metadata_pb2.MetadataMatcher.PathSegment(key="key"),
                metadata_pb2.MetadataMatcher.PathSegment(key="priority"),
            ],
            value=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact="high")),
        )
        return [], [key_priority]
    # Any case, as the shedding filter reads it (shedding.lua lower-cases the value): a client's `HIGH`
    # that the filter does not shed must take the reserve too, not the other classes' thresholds.
    header = rc.HeaderMatcher(
        name=state.overload.header, string_match=string_pb2.StringMatcher(exact="high", ignore_case=True)
    )
    return [header], []


def _reroute(route: rc.Route) -> rc.Route:
    """The model route with the shedding filter on and asked to re-route high-priority keys."""
    out = rc.Route()
    out.CopyFrom(route)
    if SHED_FILTER_NAME not in out.typed_per_filter_config:
        per_route = any_pb2.Any()
        per_route.Pack(lua_pb2.LuaPerRoute(name=SHED_CODE_NAME))
        out.typed_per_filter_config[SHED_FILTER_NAME].CopyFrom(per_route)
    out.metadata.filter_metadata[SHED_FILTER_NAME].fields["reroute_high"].CopyFrom(
        struct_pb2.Value(bool_value=True)
    )
    return out


def apply_priority_routes(routes: list[rc.Route], state: GatewayState) -> list[rc.Route]:
    """The route list with a high-priority route ahead of each route of a model with a reserve."""
    reserved = {m.id for m in state.models if reserve_of(m)}
    if not reserved or (state.auth_mode != "api_key" and not state.overload.priority_header):
        return routes
    names = {name: m.id for m in state.models if m.id in reserved for name in m.config.names}
    headers, metadata = _is_high(state)
    out = []
    for route in routes:
        name = model_route_client_name(route.name)
        if name is None or name not in names:
            out.append(route)
            continue
        high = rc.Route()
        high.CopyFrom(route)
        high.name = f"{HIGH_ROUTE_PREFIX}{name}"
        high.match.headers.extend(headers)
        high.match.dynamic_metadata.extend(metadata)
        high.route.priority = base_pb2.RoutingPriority.HIGH
        high.metadata.filter_metadata[SHED_FILTER_NAME].fields.pop("reroute_high", None)
        out.extend([high, _reroute(route) if metadata else route])
    return out
