"""Token usage of every answer, for the per-key usage accounting (control_plane/tenancy/usage*.py).

Envoy 1.40's `ai_protocol_manager` filter reads the engine's own usage out of OpenAI JSON answers and the
usage chunk of streams as they pass (it never buffers or changes them) and publishes it at the end of the
stream as typed dynamic metadata (`envoy.ai.token_usage`, an `envoy.data.ai.v3.TokenUsage`), which the
access-log entry sent to the control plane carries. The Python protos lack the filter's config, so it is
given as a `TypedStruct` that Envoy converts and validates. The filter is marked work in progress
upstream: Envoy is pinned, and tests/integration cover the behaviour relied on (counts of JSON answers
and of streams with a usage chunk; nothing for a stream without one, which the accounting charges its
`max_tokens`).

It sits last before the router, so on the way back it sees the engine's answer before the /v1/generate
filter rewrites it. Only with API keys on: without keys there is no one to charge.
"""

from __future__ import annotations

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2
from xds.type.v3 import typed_struct_pb2

from control_plane.xds.builders._common import struct

USAGE_FILTER_NAME = "envoy.filters.http.ai_protocol_manager"
TOKEN_USAGE_NAMESPACE = "envoy.ai.token_usage"  # the filter's default: typed envoy.data.ai.v3.TokenUsage
MAX_TOKENS_KEY = "max_tokens"  # under the `gateway` namespace: a request's max_tokens (listener.py)
_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.ai_protocol_manager.v3.AiProtocolManager"


def build_usage_filter() -> hcm.HttpFilter:
    config = typed_struct_pb2.TypedStruct(
        type_url=_TYPE_URL,
        # Every route: the model routes carry no per-route declaration of their API.
        value=struct({"response_handling": {"token_usage": {"include_unconfigured_routes": True}}}),
    )
    packed = any_pb2.Any()
    packed.Pack(config)
    return hcm.HttpFilter(name=USAGE_FILTER_NAME, typed_config=packed)
