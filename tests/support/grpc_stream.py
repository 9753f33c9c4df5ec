"""The plumbing shared by the test ADS and LRS clients: one bidirectional gRPC stream fed from an outbox,
read into an inbox, with the call's bearer credential as Envoy sends it from its bootstrap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc

Request = TypeVar("Request")
Response = TypeVar("Response")


class StreamClient(Generic[Request, Response]):
    """`open_call(requests, metadata)` starts the stream (a stub's stream-stream method); `credential` is
    the bearer token sent as call metadata (None: no `authorization` at all)."""

    def __init__(self, address: str, credential: str | None) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._call_metadata = (("authorization", f"Bearer {credential}"),) if credential is not None else None
        self._outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        # Reads go through a task and a queue: cancelling a pending grpc read would cancel the whole call.
        self._inbox: asyncio.Queue[Response] = asyncio.Queue()
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def _requests(self) -> AsyncIterator[Request]:
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request

    async def _read(self) -> None:
        assert self._call is not None
        async for response in self._call:
            self._inbox.put_nowait(response)

    def _open(self, open_call: Callable[..., Any]) -> None:
        self._call = open_call(self._requests(), metadata=self._call_metadata)
        self._reader = asyncio.create_task(self._read())

    async def receive(self, timeout_s: float = 5.0) -> Response:
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

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        if self._call is not None:
            self._call.cancel()
        await self._channel.close()
