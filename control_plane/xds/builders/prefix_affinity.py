"""`load_balancing: prefix_affinity`: requests sharing a prompt prefix go to the same replica, within a
bound on its load. All in Envoy; pure builders of the three pieces:

- the key filter (`prefix_affinity.lua`, shipped next to this module): a Lua filter with no default code,
  entered only on the routes of prefix-affine models (per-route config naming its code); it writes a
  short key of the conversation's prefix (or of an explicit hint: `x-session-id`, the body's `user`) into
  the `x-gateway-prefix-key` header, from bounded windows of the body and without parsing it;
- the route's hash policy on that header;
- the cluster's Maglev consistent hashing with bounded load: a replica that comes or goes moves the
  prefixes that hashed to it and about 0.1 % of the others (the table is built on the endpoints' ids, not
  their addresses, so a replica restarted on a new port keeps its prefixes); `hash_balance_factor` passes
  over a replica already holding more than `prefix_load_bound_percent` (default 115) % of the mean
  in-flight load for another one
  (a fixed pseudo-random sequence per key): a hot prefix spills over instead of overloading one replica.
  Not ring hash: its ring gives each replica `minimum_ring_size / N` points, so when N changes every
  replica gets new points and some 10 % of the remaining replicas' prefixes moved between them too
  (measured here, removing one of four).

A request with no key (no messages, prompt or hint: a body the engine refuses anyway) is placed at
random in the table, under the same bound. Least request for those would need a second cluster per model
(its own EDS and outlier state) and a route switch; not worth it for requests that carry no prefix.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.load_balancing_policies.common.v3 import common_pb2
from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2
from google.protobuf import any_pb2, message

from control_plane.config.schema import ModelConfig
from control_plane.xds.builders._common import uint32

PREFIX_FILTER_NAME = "gateway.prefix_affinity"
KEY_HEADER = "x-gateway-prefix-key"
SESSION_HEADER = "x-session-id"
POLICY = "prefix_affinity"
LB_POLICY_NAME = "envoy.load_balancing_policies.maglev"
_CODE = "prefix"


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def is_prefix_affine(model: ModelConfig) -> bool:
    return model.load_balancing == POLICY


@cache
def lua_source() -> str:
    """The key filter's Lua code (read on first use, not at import)."""
    path = resources.files("control_plane.xds.builders").joinpath("prefix_affinity.lua")
    return path.read_text(encoding="utf-8")


def build_prefix_filter() -> lua_pb2.Lua:
    """The key filter: no default code, so Envoy enters it only on routes that name its code."""
    return lua_pb2.Lua(source_codes={_CODE: base_pb2.DataSource(inline_string=lua_source())})


def prefix_per_route(model: ModelConfig) -> dict[str, any_pb2.Any]:
    """The route's per-filter config entering the key filter, for a prefix-affine model."""
    if not is_prefix_affine(model):
        return {}
    return {PREFIX_FILTER_NAME: _packed(lua_pb2.LuaPerRoute(name=_CODE))}


def hash_policy(model: ModelConfig) -> list[rc.RouteAction.HashPolicy]:
    """The route's hash policy: the key header (absent: a random entry of the table)."""
    if not is_prefix_affine(model):
        return []
    return [rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(header_name=KEY_HEADER))]


def maglev_policy(model: ModelConfig) -> maglev_pb2.Maglev:
    """The cluster's load-balancing policy for a prefix-affine model (Maglev's default table, 65537
    entries: each replica's share of the keys is within a fraction of a % of 1/N)."""
    return maglev_pb2.Maglev(
        consistent_hashing_lb_config=common_pb2.ConsistentHashingLbConfig(
            # The endpoints' hostname is their id (endpoint.py): stable across restarts on new ports.
            use_hostname_for_hashing=True,
            hash_balance_factor=uint32(model.prefix_load_bound_percent),
        ),
    )
