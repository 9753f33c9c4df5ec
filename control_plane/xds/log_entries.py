"""Reading Envoy's gRPC access-log entries: the bounded model label and the dynamic metadata fields the
gateway's filters wrote. Shared by the counters of xds/als.py and xds/generate_log.py."""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from control_plane.config.schema import Registry
from control_plane.xds.resources import METADATA_NAMESPACE

UNKNOWN_MODEL = "(unknown)"
NO_MODEL = "(none)"


def metadata_fields(entry: accesslog_pb2.HTTPAccessLogEntry, namespace: str) -> dict[str, struct_pb2.Value]:
    found = entry.common_properties.metadata.filter_metadata.get(namespace)
    return dict(found.fields) if found is not None else {}


def string_field(fields: dict[str, struct_pb2.Value], key: str) -> str | None:
    value = fields.get(key)
    if value is not None and value.WhichOneof("kind") == "string_value" and value.string_value:
        return value.string_value
    return None


def number_field(fields: dict[str, struct_pb2.Value], key: str) -> float | None:
    value = fields.get(key)
    if value is not None and value.WhichOneof("kind") == "number_value" and value.number_value >= 0:
        return value.number_value
    return None


class ModelNames:
    """Client-given model names → model ids, so a label is a registry id or one of two fixed values
    whatever clients send: (unknown) for a name no model has, (none) for a request naming none."""

    def __init__(self, registry: Registry) -> None:
        self._names: dict[str, str] = {}
        self.follow_registry(registry)

    def follow_registry(self, registry: Registry) -> None:
        self._names = {name: model.id for model in registry.models for name in model.names}

    def of(self, name: str | None) -> str:
        """The label of a client-given name (None or empty: the request named none)."""
        if not name:
            return NO_MODEL
        return self._names.get(name, UNKNOWN_MODEL)

    def label(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
        return self.of(string_field(metadata_fields(entry, METADATA_NAMESPACE), "model"))
