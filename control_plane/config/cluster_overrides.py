"""Cluster overrides, raw Envoy fields merged over the generated cluster: what they may set."""

from __future__ import annotations

from typing import Any


def _owned_cluster_fields() -> dict[str, str]:
    """Cluster fields the gateway sets itself, under both spellings the JSON parser accepts: the
    cluster's name (routes and metrics use it), how it finds its endpoints (EDS, which the snapshot's
    consistency check and every health or drain change rely on)."""
    from envoy.config.cluster.v3 import cluster_pb2

    fields = cluster_pb2.Cluster.DESCRIPTOR.fields_by_name
    owned = ("name", "alt_stat_name", "type", "cluster_type", "eds_cluster_config", "load_assignment")
    return {spelling: name for name in owned for spelling in (name, fields[name].json_name)}


def check_cluster_overrides(value: dict[str, Any]) -> dict[str, Any]:
    """The overrides, or ValueError naming each key the gateway owns or the parse error of a typo."""
    owned = _owned_cluster_fields()
    taken = [key for key in value if key in owned]
    if taken:
        raise ValueError(
            "; ".join(
                f"cluster_overrides.{key}: set by the gateway (the cluster's name and its EDS "
                "endpoints are what routes, health and drains rely on), it cannot be overridden"
                for key in taken
            )
        )
    # Parse now so that a typo fails the load with its path; Envoy still validates the values.
    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    from control_plane.xds.builders._common import register_extension_types

    register_extension_types()

    try:
        json_format.ParseDict(value, cluster_pb2.Cluster())
    except json_format.ParseError as exc:
        raise ValueError(f"not a valid Envoy Cluster fragment: {exc}") from None
    return value
