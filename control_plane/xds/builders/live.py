"""The keys' live state in Envoy: a small Lua filter right after the key check, whose config (the code with a
table of the ACTIVE keys' recent use as data) comes over an ECDS stream of its own.

What it does with the table (live.lua):
- on every answer to a key with limits, OpenAI's `x-ratelimit-remaining-requests|tokens` (the limit less
  what the key used in the last minute across every Envoy, never below 0) and `x-ratelimit-reset-*` (how
  long until the used part has refilled at the limit's rate, as `42s` or `6m0s`);
- while a key is at its concurrency limit (`max_concurrent`), or its tokens in the last minute plus the
  `max_tokens` its requests in flight hold reach its tokens per minute, its new requests get 429
  `rate_limit_exceeded` with `retry-after: 1`. That part of the code is there only while some key is at
  its limit: otherwise the filter is not entered on the request path at all.

Why its own stream, not the ADS one: the ADS server answers a type with every resource of that type, so a
second ECDS resource there would resend the whole key table (about 1 MB per 10,000 keys) with every change
of the live state. Here the control plane (tenancy/live_server.py) serves this one small resource on the
ExtensionConfigDiscoveryService, pushed when it changed and at most about once a second. Neither stream
ever touches the listener: ECDS updates swap the filter's config without draining a connection.
Until the first table arrives, the default config has an empty table (remaining = the whole limit).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2, grpc_service_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2, message

from control_plane.xds.builders._common import seconds
from control_plane.xds.builders.access_log import CONTROL_PLANE_CLUSTER
from control_plane.xds.builders.keys import LUA_TYPE

LIVE_FILTER_NAME = "gateway.key_live"
# The refusal's code under the key check's namespace; the local reply rule of it (local_reply.py) answers
# OpenAI's 429 `rate_limit_exceeded` (type `requests`) with `retry-after: 1`.
CONCURRENCY_REFUSAL = "concurrency_limit"
_FORBIDDEN = ("\t", "\n", "]=====]")

# Entered for keyed requests only while some key is at its limit (appended to the code then).
_BLOCK = """
function envoy_on_request(handle)
  local gateway = handle:streamInfo():dynamicMetadata():get("gateway")
  local key = gateway and gateway.key
  local live = key and LIVE[key.key_id]
  if live and live.blocked then
    handle:streamInfo():dynamicMetadata():set("gateway.key", "error", "CONCURRENCY_REFUSAL")
    handle:respond({ [":status"] = "429", ["retry-after"] = "1" },
      "Too many concurrent requests on the API key `" .. key.key_name .. "`: limit " .. live.blocked ..
      " requests in flight. Retry after 1 s.")
  elseif live and live.tokens_blocked then
    -- The key check's own code for its tokens-per-minute refusal: the same 429 (local_reply.py).
    handle:streamInfo():dynamicMetadata():set("gateway.key", "error", "rate_limit_exceeded")
    handle:respond({ [":status"] = "429", ["retry-after"] = "1",
        ["x-ratelimit-limit-tokens"] = live.tokens_blocked, ["x-ratelimit-remaining-tokens"] = "0",
        ["x-ratelimit-reset-tokens"] = "1s" },
      "Rate limit reached for tokens on the API key `" .. key.key_name .. "`: limit " ..
      live.tokens_blocked .. " tokens per minute, counting the max_tokens of its requests in flight. " ..
      "Retry after 1 s.")
  end
end
""".replace("CONCURRENCY_REFUSAL", CONCURRENCY_REFUSAL)


@dataclass(frozen=True)
class LiveEntry:
    """One active key's row: its use in the last minute across every Envoy."""

    key_id: str
    requests: int = 0
    requests_reset_at: int = 0  # epoch seconds
    tokens: int = 0
    tokens_reset_at: int = 0
    in_flight: int = 0
    blocked_at: int = 0  # the concurrency limit, when reached; 0: not refused
    # The tokens-per-minute limit, when the window's tokens and those held by requests in flight reach
    # it (tenancy/live.py); 0: not refused here (the key table refuses a key whose window alone is full).
    tokens_blocked_at: int = 0

    def line(self) -> str:
        fields = [
            self.key_id,
            *(
                str(max(0, int(v)))
                for v in (
                    self.requests,
                    self.requests_reset_at,
                    self.tokens,
                    self.tokens_reset_at,
                    self.in_flight,
                    self.blocked_at,
                    self.tokens_blocked_at,
                )
            ),
        ]
        if not self.key_id or any(bad in field for field in fields for bad in _FORBIDDEN):
            raise ValueError(f"key {self.key_id!r}: an id holding a tab, newline or the data delimiter")
        return "\t".join(fields) + "\n"


@cache
def _code() -> str:
    return resources.files("control_plane.xds.builders").joinpath("live.lua").read_text()


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def live_source(entries: Iterable[LiveEntry]) -> str:
    rows = sorted(entries, key=lambda e: e.key_id)
    code = f"local LIVE_DATA = [=====[\n{''.join(e.line() for e in rows)}]=====]\n{_code()}"
    if any(e.blocked_at or e.tokens_blocked_at for e in rows):
        code += _BLOCK
    return code


def build_live_extension(entries: Iterable[LiveEntry]) -> extension_pb2.TypedExtensionConfig:
    """The ECDS resource: the filter's code with the active keys' table as data."""
    lua = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=live_source(entries)))
    return extension_pb2.TypedExtensionConfig(name=LIVE_FILTER_NAME, typed_config=_packed(lua))


def build_live_filter(credential: str, cluster: str = CONTROL_PLANE_CLUSTER) -> hcm.HttpFilter:
    """The listener's reference: the control plane's ExtensionConfigDiscoveryService on its own gRPC
    stream (the deployment-wide stream credential, as the access-log and quota streams), with an empty
    table until the first push."""
    metadata = [base_pb2.HeaderValue(key="authorization", value=f"Bearer {credential}")] if credential else []
    source = config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            transport_api_version=config_source_pb2.ApiVersion.V3,
            grpc_services=[
                grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster),
                    initial_metadata=metadata,
                )
            ],
        ),
        resource_api_version=config_source_pb2.ApiVersion.V3,
        initial_fetch_timeout=seconds(5),
    )
    default = build_live_extension(()).typed_config
    return hcm.HttpFilter(
        name=LIVE_FILTER_NAME,
        config_discovery=config_source_pb2.ExtensionConfigSource(
            config_source=source,
            type_urls=[LUA_TYPE],
            default_config=default,
            apply_default_config_without_warming=True,
        ),
    )
