"""Small protobuf helpers shared by the builders."""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2


def seconds(value: float) -> duration_pb2.Duration:
    whole = int(value)
    return duration_pb2.Duration(seconds=whole, nanos=round((value - whole) * 1e9))


def uint32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def struct(values: dict[str, object]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def register_extension_types() -> None:
    """Import the protobuf modules of the extensions a cluster may name in a typed config, so that
    operators' `cluster_overrides` can be parsed from JSON (`@type` needs its descriptor loaded)."""
    import importlib

    for module in (
        "envoy.extensions.load_balancing_policies.least_request.v3.least_request_pb2",
        "envoy.extensions.load_balancing_policies.round_robin.v3.round_robin_pb2",
        "envoy.extensions.load_balancing_policies.random.v3.random_pb2",
        "envoy.extensions.load_balancing_policies.ring_hash.v3.ring_hash_pb2",
        "envoy.extensions.load_balancing_policies.maglev.v3.maglev_pb2",
        "envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3."
        "client_side_weighted_round_robin_pb2",
        "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
        "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    ):
        importlib.import_module(module)
