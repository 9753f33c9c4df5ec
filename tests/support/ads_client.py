"""A minimal ADS client that speaks state-of-the-world xDS the way Envoy does (requests, ACKs, NACKs)."""

from __future__ import annotations

import asyncio

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from tests.support.grpc_stream import StreamClient


class AdsClient(StreamClient[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse]):
    """`metadata` is the node's metadata; `credential` the bearer token sent as call metadata, as Envoy
    sends the `initial_metadata` of its bootstrap (None: no `authorization` at all)."""

    def __init__(
        self,
        address: str,
        node_id: str,
        metadata: dict[str, str] | None = None,
        credential: str | None = None,
    ) -> None:
        super().__init__(address, credential)
        self._stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._node = base_pb2.Node(id=node_id, cluster="test")
        if metadata:
            meta = struct_pb2.Struct()
            meta.update(metadata)
            self._node.metadata.CopyFrom(meta)

    async def start(self) -> None:
        self._open(self._stub.StreamAggregatedResources)

    def send(
        self,
        type_url: str,
        *,
        version: str = "",
        nonce: str = "",
        names: list[str] | None = None,
        error: str | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=version,
            response_nonce=nonce,
            resource_names=names or [],
            node=self._node,
        )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._outbox.put_nowait(request)

    async def expect_silence(self, seconds: float = 0.5) -> None:
        """Assert that no response arrives for a while (e.g. no re-push after a NACK)."""
        try:
            response = await asyncio.wait_for(self._inbox.get(), timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected response: {response.type_url} version {response.version_info}")

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: list[str] | None = None) -> None:
        self.send(response.type_url, version=response.version_info, nonce=response.nonce, names=names)
