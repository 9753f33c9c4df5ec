"""Fallback routes: a model's routes switched to its fallback's cluster while it cannot serve.

The control plane chooses the switches (control_plane/overload/fallback.py, from health and saturation)
and they change the route table only (RDS: no listener drain). A switched route keeps its match, its key
check data (the key's model access is judged on the model the client asked for) and its retry policy and
timeouts; it sends the request to the fallback's cluster with the body's `model` rewritten to the name
the fallback's servers know (its `served_model`, else its id) by the rename filter (generate.py), and
answers with `x-gateway-model: <fallback id>` and `x-gateway-fallback-from: <model id>`. Its name,
`fallback:<client name>><fallback id>`, is what the access-log stream counts fallbacks by (`>` is in no
model name).
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc

from control_plane.state import GatewayState, ModelState
from control_plane.xds.builders._common import struct
from control_plane.xds.builders.generate import (
    LUA_FILTER_NAME,
    RENAME_FILTER_NAME,
    rename_per_route,
    route_data,
)
from control_plane.xds.resources import cluster_name, model_route_client_name

FALLBACK_ROUTE_PREFIX = "fallback:"
MODEL_HEADER = "x-gateway-model"
FALLBACK_FROM_HEADER = "x-gateway-fallback-from"


def fallback_route_name(client_name: str, fallback_id: str) -> str:
    return f"{FALLBACK_ROUTE_PREFIX}{client_name}>{fallback_id}"


def fallback_of_route(route_name: str) -> str | None:
    """The fallback id a route name carries, or None for any other route."""
    if not route_name.startswith(FALLBACK_ROUTE_PREFIX) or ">" not in route_name:
        return None
    return route_name.rsplit(">", 1)[1] or None


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def switch_route(route: rc.Route, model: ModelState, fallback: ModelState) -> rc.Route:
    """A copy of one of `model`'s routes sending its requests to `fallback`'s servers."""
    client_name = model_route_client_name(route.name) or route.name
    out = rc.Route()
    out.CopyFrom(route)
    out.name = fallback_route_name(client_name, fallback.id)
    out.route.cluster = cluster_name(fallback.id)
    served = fallback.config.served_model or fallback.id
    renamed = fallback.config.model_copy(update={"served_model": served})
    # The generate filter (/v1/generate) and the rename filter read the fallback's data.
    out.metadata.filter_metadata[LUA_FILTER_NAME].CopyFrom(struct(route_data(renamed)))
    out.metadata.filter_metadata[RENAME_FILTER_NAME].CopyFrom(struct({"served_model": served}))
    for name, config in rename_per_route(renamed).items():
        out.typed_per_filter_config[name].CopyFrom(config)
    for added in out.request_headers_to_add:  # the model id the engine is told
        if added.header.key == MODEL_HEADER:
            added.header.value = fallback.id
    out.response_headers_to_add.extend(
        [_header(MODEL_HEADER, fallback.id), _header(FALLBACK_FROM_HEADER, model.id)]
    )
    return out


def apply_fallbacks(routes: list[rc.Route], state: GatewayState) -> list[rc.Route]:
    """The route list with the model routes of every switched model replaced by fallback routes."""
    if not state.fallbacks:
        return routes
    by_id = {m.id: m for m in state.models}
    names = {name: m.id for m in state.models for name in m.config.names}
    switched = dict(state.fallbacks)
    out = []
    for route in routes:
        model_id = names.get(model_route_client_name(route.name) or "")
        target = switched.get(model_id or "")
        if model_id and target in by_id:
            out.append(switch_route(route, by_id[model_id], by_id[target]))
        else:
            out.append(route)
    return out
