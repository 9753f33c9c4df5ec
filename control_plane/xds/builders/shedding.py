"""Priority shedding inside Envoy: a Lua filter entered only on the routes of saturated models.

The control plane decides which models are saturated (control_plane/overload/saturation.py). The filter's
code is fixed and named in the listener (no default code, so Envoy enters it on no other request: a Lua
coroutine costs about 20 µs); a saturated model's routes name that code and carry the level, the priority
header (when the registry allows one) and the `retry-after` in their metadata. So a saturation change is
a route (RDS) update: no listener drain, in effect in milliseconds, and models that are not saturated pay
nothing. (The API-key table goes over ECDS instead: it is one big table, the same for every route.)

Models with a reserve for high priority enter it too when API keys are on (priority.py: `reroute_high`).
A model switched to a fallback (fallback.py) is not shed: its requests go to a model that is not
saturated. The filter sits after the API-key check, whose metadata carries the key's priority class.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2, message

from control_plane.state import GatewayState
from control_plane.xds.builders._common import struct
from control_plane.xds.resources import model_route_client_name

SHED_FILTER_NAME = "gateway.shedding"
# Dynamic metadata a shed request carries (its class): the local reply rule and the counters key on it.
SHED_NAMESPACE = "gateway.shed"
SHED_CODE_NAME = "shed"


@cache
def _code() -> str:
    return resources.files("control_plane.xds.builders").joinpath("shedding.lua").read_text()


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def build_shedding_filter() -> hcm.HttpFilter:
    """The listener's filter: the code, named, entered only on routes that name it."""
    lua = lua_pb2.Lua(source_codes={SHED_CODE_NAME: base_pb2.DataSource(inline_string=_code())})
    return hcm.HttpFilter(name=SHED_FILTER_NAME, typed_config=_packed(lua))


def shed_levels(state: GatewayState) -> dict[str, int]:
    """Model id → shed level, for the models whose requests land on a saturated cluster: saturated and
    not switched to a fallback."""
    if not state.overload.enabled:
        return {}
    switched = {model_id for model_id, _ in state.fallbacks}
    return {m: min(level, 2) for m, level in state.saturation if level > 0 and m not in switched}


def _route_data(state: GatewayState, model_id: str, level: int) -> dict[str, object]:
    data: dict[str, object] = {
        "model": model_id,
        "level": level,
        "retry_after": str(state.overload.retry_after_s),
    }
    if state.overload.priority_header:
        data["header"] = state.overload.header
    return data


def apply_shedding(routes: list[rc.Route], state: GatewayState) -> list[rc.Route]:
    """The route list with the shedding filter turned on for the routes of every model to be shed."""
    levels = shed_levels(state)
    if not levels:
        return routes
    names = {name: m.id for m in state.models if m.id in levels for name in m.config.names}
    out = []
    for route in routes:
        model_id = names.get(model_route_client_name(route.name) or "")
        if model_id is None:
            out.append(route)
            continue
        shed = rc.Route()
        shed.CopyFrom(route)
        shed.typed_per_filter_config[SHED_FILTER_NAME].CopyFrom(
            _packed(lua_pb2.LuaPerRoute(name=SHED_CODE_NAME))
        )
        shed.metadata.filter_metadata[SHED_FILTER_NAME].CopyFrom(
            struct(_route_data(state, model_id, levels[model_id]))
        )
        out.append(shed)
    return out
