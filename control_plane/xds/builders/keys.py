"""The API-key check: an HTTP filter whose config comes over ECDS, so keys change without a listener update.

Envoy has no native check of hashed bearer keys (`api_key_auth` compares keys in clear), and the gateway
stores only their SHA-256. So the check is Lua (keys.lua): a pure-Lua SHA-256 of the presented key looked
up in a table of hashes, which travels as one data string at the top of the code (a table literal is refused
past ~21k keys: LuaJIT's constant limit). The listener names the filter with `config_discovery`; the table
is a `TypedExtensionConfig` resource of its own (ECDS), pushed on every key change: no listener drain, no
stream cut, in effect in tens of milliseconds. Until the first push the filter's default refuses every
request (503), so a key check is never skipped.

Model routes carry their model id in metadata under this filter's name (route.py), for the 403 of a model
the key may not use; /health skips the check.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2, message

from control_plane.state import GatewayState, KeyEntry
from control_plane.xds.builders._common import ads_source, seconds, struct

KEY_FILTER_NAME = "gateway.api_keys"
KEY_ID_HEADER = "x-gateway-key-id"  # set for the quota filter behind the check; removed before engines
LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
# Fields of a data line may not hold these; key ids and names are checked names (config/auth.py) anyway.
_FORBIDDEN = ("\t", "\n", "]=====]")

_UNAVAILABLE = """
function envoy_on_request(handle)
  handle:streamInfo():dynamicMetadata():set("gateway.key", "error", "keys_unavailable")
  handle:respond({[":status"] = "503"}, "The gateway has not received its API keys yet. Retry shortly.")
end
"""


@cache
def _code() -> str:
    return resources.files("control_plane.xds.builders").joinpath("keys.lua").read_text()


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _models_field(entry: KeyEntry, ids: dict[str, str]) -> str:
    if entry.models is None:
        return "*"
    # Names resolve to ids here, so an alias added or removed later changes nothing for the key; a name no
    # model has (yet) allows nothing.
    allowed = sorted({ids[name] for name in entry.models if name in ids})
    return "," + ",".join(allowed) + ","


def key_data(state: GatewayState) -> str:
    ids = {name: model.id for model in state.models for name in model.config.names}
    lines = []
    for entry in sorted(state.keys, key=lambda e: e.sha256):
        fields = [
            entry.sha256,
            entry.id,
            entry.name,
            entry.priority,
            _models_field(entry, ids),
            str(entry.expires_at),
            entry.denied,
            str(entry.denied_until),
            str(entry.rpm_limit),
            str(entry.tpm_limit),
        ]
        if any(bad in field for field in fields for bad in _FORBIDDEN):
            raise ValueError(f"key {entry.id!r}: a field holds a tab, newline or the data delimiter")
        lines.append("\t".join(fields) + "\n")
    return "".join(lines)


def build_key_extension(state: GatewayState) -> extension_pb2.TypedExtensionConfig:
    """The ECDS resource: the check's code with the key table (hashes only) as data."""
    source = f"local KEY_DATA = [=====[\n{key_data(state)}]=====]\n{_code()}"
    lua = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=source))
    return extension_pb2.TypedExtensionConfig(name=KEY_FILTER_NAME, typed_config=_packed(lua))


def build_key_filter() -> hcm.HttpFilter:
    """The listener's reference to the ECDS resource, with a refuse-all default until it arrives."""
    default = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=_UNAVAILABLE))
    source = ads_source()
    source.initial_fetch_timeout.CopyFrom(seconds(5))
    return hcm.HttpFilter(
        name=KEY_FILTER_NAME,
        config_discovery=config_source_pb2.ExtensionConfigSource(
            config_source=source,
            type_urls=[LUA_TYPE],
            default_config=_packed(default),
            apply_default_config_without_warming=True,
        ),
    )


def key_route_metadata(model_id: str) -> dict[str, object]:
    """filter_metadata entry of a model route: the model id the key check compares."""
    return {KEY_FILTER_NAME: struct({"model": model_id})}


def skip_key_check() -> dict[str, any_pb2.Any]:
    """typed_per_filter_config of a route open without a key (/health)."""
    return {KEY_FILTER_NAME: _packed(lua_pb2.LuaPerRoute(disabled=True))}
