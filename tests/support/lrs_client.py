"""A minimal LRS client that reports load the way Envoy does (first message with the node, then reports)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc


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


class LrsClient:
    def __init__(self, address: str, node_id: str, credential: str | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = lrs_pb2_grpc.LoadReportingServiceStub(self._channel)
        self._node = base_pb2.Node(id=node_id, cluster="test")
        self._metadata = (("authorization", f"Bearer {credential}"),) if credential is not None else None
        self._outbox: asyncio.Queue[lrs_pb2.LoadStatsRequest | None] = asyncio.Queue()
        self._inbox: asyncio.Queue[lrs_pb2.LoadStatsResponse] = asyncio.Queue()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None

    async def _requests(self) -> AsyncIterator[lrs_pb2.LoadStatsRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    async def _read(self) -> None:
        assert self._call is not None
        async for response in self._call:
            self._inbox.put_nowait(response)

    async def start(self, *clusters: load_report_pb2.ClusterStats) -> None:
        """Open the stream with Envoy's first message: the node, with figures as after a reconnect."""
        self._call = self._stub.StreamLoadStats(self._requests(), metadata=self._metadata)
        self._reader = asyncio.create_task(self._read())
        self._outbox.put_nowait(lrs_pb2.LoadStatsRequest(node=self._node, cluster_stats=list(clusters)))

    def report(self, *clusters: load_report_pb2.ClusterStats) -> None:
        self._outbox.put_nowait(lrs_pb2.LoadStatsRequest(node=self._node, cluster_stats=list(clusters)))

    async def receive(self, timeout_s: float = 5.0) -> lrs_pb2.LoadStatsResponse:
        return await asyncio.wait_for(self._inbox.get(), timeout=timeout_s)

    async def refused(self, timeout_s: float = 10.0) -> grpc.StatusCode:
        """Wait for the server to end the stream and return its status code; fail if it answered."""
        assert self._reader is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        else:
            raise AssertionError("the stream ended without an error status")
        if not self._inbox.empty():
            raise AssertionError("the server answered before refusing")
        return code

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        if self._call is not None:
            self._call.cancel()
        await self._channel.close()
