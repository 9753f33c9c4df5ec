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
