"""An immutable, versioned set of resources for one Envoy, and the consistency check gating its push."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2, message

from control_plane.errors import InconsistentSnapshotError
from control_plane.xds.resources import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, PUSH_ORDER, ROUTE

Resources = Mapping[str, message.Message]


def content_version(resources: Resources) -> str:
    """A hash of the serialized resources: equal content, equal version, whoever built it and when."""
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(resources[name].SerializeToString(deterministic=True))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    resources: Mapping[str, Resources]  # type URL → name → resource
    versions: Mapping[str, str]  # type URL → content version

    @classmethod
    def create(cls, resources: Mapping[str, Resources]) -> Snapshot:
        frozen = {t: MappingProxyType(dict(resources.get(t, {}))) for t in PUSH_ORDER}
        return cls(
            resources=MappingProxyType(frozen),
            versions=MappingProxyType({t: content_version(r) for t, r in frozen.items()}),
        )

    def replacing(self, type_url: str, resources: Resources, version: str | None = None) -> Snapshot:
        """This snapshot with one type's resources replaced; the other types keep their versions.

        `version` saves hashing again when the same resources go into several nodes' snapshots."""
        frozen = dict(self.resources)
        frozen[type_url] = MappingProxyType(dict(resources))
        versions = dict(self.versions)
        versions[type_url] = version or content_version(frozen[type_url])
        return Snapshot(resources=MappingProxyType(frozen), versions=MappingProxyType(versions))

    def packed(self, type_url: str) -> Mapping[str, any_pb2.Any]:
        """The type's resources packed for the wire, packed once per snapshot whatever the Envoys."""
        cache: dict[str, Mapping[str, any_pb2.Any]] = self.__dict__.setdefault("_packed", {})
        if type_url not in cache:
            packed = {}
            for name, resource in self.resources[type_url].items():
                item = any_pb2.Any()
                item.Pack(resource)
                packed[name] = item
            cache[type_url] = packed
        return cache[type_url]

    @property
    def version(self) -> str:
        return "-".join(self.versions[t] for t in PUSH_ORDER)

    def consistency_problems(self) -> list[str]:
        """Every cross-reference that would leave Envoy warming forever or routing to nothing."""
        problems = []
        clusters = self.resources[CLUSTER]
        assignments = self.resources[ENDPOINT]
        routes = self.resources[ROUTE]
        eds_names = set()
        for name, cluster in clusters.items():
            assert isinstance(cluster, cluster_pb2.Cluster)
            if cluster.type == cluster_pb2.Cluster.DiscoveryType.EDS:
                eds_name = cluster.eds_cluster_config.service_name or name
                eds_names.add(eds_name)
                if eds_name not in assignments:
                    problems.append(f"cluster {name!r} has no endpoint assignment {eds_name!r}")
        problems.extend(
            f"endpoint assignment {n!r} belongs to no cluster" for n in assignments if n not in eds_names
        )
        for name, route_config in routes.items():
            assert isinstance(route_config, route_pb2.RouteConfiguration)
            for vhost in route_config.virtual_hosts:
                for route in vhost.routes:
                    if (
                        route.HasField("route")
                        and route.route.cluster
                        and route.route.cluster not in clusters
                    ):
                        problems.append(
                            f"route {route.name!r} of {name!r} targets unknown cluster "
                            f"{route.route.cluster!r}"
                        )
        for name, listener in self.resources[LISTENER].items():
            assert isinstance(listener, listener_pb2.Listener)
            for chain in listener.filter_chains:
                for flt in chain.filters:
                    manager = hcm.HttpConnectionManager()
                    if not flt.typed_config.Unpack(manager):
                        continue
                    if manager.HasField("rds") and manager.rds.route_config_name not in routes:
                        problems.append(
                            f"listener {name!r} needs route configuration {manager.rds.route_config_name!r}"
                        )
                    problems.extend(
                        f"listener {name!r} needs filter config {http.name!r} (ECDS)"
                        for http in manager.http_filters
                        if http.HasField("config_discovery")
                        and http.config_discovery.config_source.HasField("ads")  # others: own streams
                        and http.name not in self.resources[EXTENSION_CONFIG]
                    )
        return problems

    def check_consistent(self) -> None:
        # Checked once per snapshot object: nodes that share a snapshot share the verdict.
        if "_problems" not in self.__dict__:
            self.__dict__["_problems"] = self.consistency_problems()
        problems: list[str] = self.__dict__["_problems"]
        if problems:
            raise InconsistentSnapshotError(problems)
