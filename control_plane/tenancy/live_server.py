"""The live-state filter's config source: the control plane's ExtensionConfigDiscoveryService (ECDS on a
gRPC stream of its own, state of the world), serving one small resource (builders/live.py) to every Envoy.

Per stream: the current resource is sent on the first request and again whenever it is published;
only the latest one is ever queued (a slow Envoy gets the newest table, not a backlog). Envoy's ACKs
need nothing; a NACK is logged and counted (the next table is sent anyway: a table is data, so a
rejected one means a bug, not a transient). The stream is authenticated like the access-log and quota
streams (xds/auth.py, the deployment-wide credential).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import extension_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.extension.v3 import config_discovery_pb2_grpc
from google.protobuf import any_pb2

from control_plane.xds.auth import XdsAuthenticator
from control_plane.xds.builders.live import LIVE_FILTER_NAME, LiveEntry, build_live_extension
from control_plane.xds.resources import EXTENSION_CONFIG
from control_plane.xds.snapshot import content_version

log = logging.getLogger(__name__)


class _Stream:
    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.sent_version = ""


class LiveConfigServicer(config_discovery_pb2_grpc.ExtensionConfigDiscoveryServiceServicer):
    def __init__(self, authenticator: XdsAuthenticator | None = None) -> None:
        self._auth = authenticator
        self._resource = any_pb2.Any()
        self._resource.Pack(build_live_extension(()))
        self._version = content_version({LIVE_FILTER_NAME: build_live_extension(())})
        self._streams: set[_Stream] = set()
        self._nonces = itertools.count(1)
        self.nacks = 0
        self.sent = 0

    async def publish(self, entries: tuple[LiveEntry, ...]) -> None:
        """Make this the table every Envoy gets (sent by each stream's own writer, never waited for)."""
        extension: extension_pb2.TypedExtensionConfig = build_live_extension(entries)
        version = content_version({LIVE_FILTER_NAME: extension})
        if version == self._version:
            return
        packed = any_pb2.Any()
        packed.Pack(extension)
        self._resource, self._version = packed, version
        for stream in self._streams:
            stream.wake.set()

    def stream_count(self) -> int:
        return len(self._streams)

    async def StreamExtensionConfigs(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        requests = request_iterator
        if self._auth is not None:
            requests = await self._auth.admit("ecds-live", requests, context, node_bound=False)
        stream = _Stream()
        stream.wake.set()  # the first request is answered at once
        self._streams.add(stream)
        reader = asyncio.create_task(self._read(requests, stream))
        try:
            while True:
                await stream.wake.wait()
                if reader.done():
                    return
                stream.wake.clear()
                if stream.sent_version == self._version:
                    continue
                version = self._version
                yield discovery_pb2.DiscoveryResponse(
                    version_info=version,
                    resources=[self._resource],
                    type_url=EXTENSION_CONFIG,
                    nonce=str(next(self._nonces)),
                )
                stream.sent_version = version
                self.sent += 1
        finally:
            self._streams.discard(stream)
            reader.cancel()

    async def _read(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], stream: _Stream) -> None:
        try:
            async for request in requests:
                if request.HasField("error_detail"):
                    self.nacks += 1
                    log.error(
                        "Envoy %s rejected the keys' live state (version %s): %s",
                        request.node.id or "?",
                        request.response_nonce,
                        request.error_detail.message,
                    )
        except grpc.aio.AioRpcError:
            pass
        except Exception:
            log.exception("live-state stream failed")
        finally:
            stream.wake.set()  # the writer sees the reader done and ends the stream


def add_live_servicer(server: grpc.aio.Server, servicer: LiveConfigServicer) -> None:
    config_discovery_pb2_grpc.add_ExtensionConfigDiscoveryServiceServicer_to_server(servicer, server)
