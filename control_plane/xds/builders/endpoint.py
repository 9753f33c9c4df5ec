"""Model → ClusterLoadAssignment: one LbEndpoint per replica with its health and weight."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from control_plane.state import Health, ModelState
from control_plane.xds.builders._common import struct, uint32
from control_plane.xds.resources import METADATA_NAMESPACE, cluster_name

_HEALTH = {
    Health.UNKNOWN: health_check_pb2.HealthStatus.UNKNOWN,
    Health.HEALTHY: health_check_pb2.HealthStatus.HEALTHY,
    Health.UNHEALTHY: health_check_pb2.HealthStatus.UNHEALTHY,
    Health.DRAINING: health_check_pb2.HealthStatus.DRAINING,
}


def build_load_assignment(model: ModelState) -> endpoint_pb2.ClusterLoadAssignment:
    lb_endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=ep.address, port_value=ep.port)
                ),
                # Not used for routing; shows in Envoy's /clusters and %UPSTREAM_HOST_NAME%.
                hostname=ep.id,
            ),
            health_status=_HEALTH[ep.health],
            load_balancing_weight=uint32(ep.weight),
            metadata=base_pb2.Metadata(filter_metadata={METADATA_NAMESPACE: struct({"endpoint_id": ep.id})}),
        )
        for ep in sorted(model.endpoints, key=lambda e: e.id)
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name(model.id),
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)]
        if lb_endpoints
        else [],
    )
