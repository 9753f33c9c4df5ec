"""A minimal ADS client that speaks state-of-the-world xDS the way Envoy does (requests, ACKs, NACKs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2


class AdsClient:
    """`metadata` is the node's metadata; `credential` the bearer token sent as call metadata, as Envoy
    sends the `initial_metadata` of its bootstrap (None: no `authorization` at all)."""

    def __init__(
        self,
        address: str,
        node_id: str,
        metadata: dict[str, str] | None = None,
        credential: str | None = None,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._call_metadata = (("authorization", f"Bearer {credential}"),) if credential is not None else None
        self._stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self._node = base_pb2.Node(id=node_id, cluster="test")
        if metadata:
            meta = struct_pb2.Struct()
            meta.update(metadata)
            self._node.metadata.CopyFrom(meta)
        self._call: grpc.aio.StreamStreamCall | None = None
        # Reads go through a task and a queue: cancelling a pending grpc read would cancel the whole call.
        self._inbox: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    async def start(self) -> None:
        self._call = self._stub.StreamAggregatedResources(self._requests(), metadata=self._call_metadata)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._call is not None
        async for response in self._call:
            self._inbox.put_nowait(response)

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

    async def receive(self, timeout_s: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        return await asyncio.wait_for(self._inbox.get(), timeout=timeout_s)

    async def refused(self, timeout_s: float = 10.0) -> grpc.StatusCode:
        """Wait for the server to end the stream and return its status code; fail if it sent anything."""
        assert self._reader is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        else:
            raise AssertionError("the stream ended without an error status")
        if not self._inbox.empty():
            raise AssertionError(f"the server sent {self._inbox.qsize()} responses before refusing")
        return code

    async def expect_silence(self, seconds: float = 0.5) -> None:
        """Assert that no response arrives for a while (e.g. no re-push after a NACK)."""
        try:
            response = await asyncio.wait_for(self._inbox.get(), timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected response: {response.type_url} version {response.version_info}")

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: list[str] | None = None) -> None:
        self.send(response.type_url, version=response.version_info, nonce=response.nonce, names=names)

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        if self._call is not None:
            self._call.cancel()
        await self._channel.close()
