"""A minimal LRS client that reports load the way Envoy does (first message with the node, then reports)."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc

from tests.support.grpc_stream import StreamClient


def endpoint_report(cluster: str, host: str, port: int, in_progress: int) -> load_report_pb2.ClusterStats:
    """One cluster's figures with one endpoint `host:port` having `in_progress` requests in flight."""
    return load_report_pb2.ClusterStats(
        cluster_name=cluster,
        upstream_locality_stats=[
            load_report_pb2.UpstreamLocalityStats(
                upstream_endpoint_stats=[
                    load_report_pb2.UpstreamEndpointStats(
                        address=address_pb2.Address(
                            socket_address=address_pb2.SocketAddress(address=host, port_value=port)
                        ),
                        total_requests_in_progress=in_progress,
                    )
                ],
                total_requests_in_progress=in_progress,
            )
        ],
    )


class LrsClient(StreamClient[lrs_pb2.LoadStatsRequest, lrs_pb2.LoadStatsResponse]):
    def __init__(self, address: str, node_id: str, credential: str | None = None) -> None:
        super().__init__(address, credential)
        self._stub = lrs_pb2_grpc.LoadReportingServiceStub(self._channel)
        self._node = base_pb2.Node(id=node_id, cluster="test")

    async def start(self, *clusters: load_report_pb2.ClusterStats) -> None:
        """Open the stream with Envoy's first message: the node, with figures as after a reconnect."""
        self._open(self._stub.StreamLoadStats)
        self.report(*clusters)

    def report(self, *clusters: load_report_pb2.ClusterStats) -> None:
        self._outbox.put_nowait(lrs_pb2.LoadStatsRequest(node=self._node, cluster_stats=list(clusters)))
