"""gRPC ADS transport, state of the world (as go-control-plane's `pkg/server/sotw/v3`).

Per stream and per type it tracks the last nonce and version sent. A request carrying the last nonce is
an ACK, or a NACK when it has `error_detail`: a NACK is logged and counted and the rejected version is
not sent again; the next push happens only when the snapshot's content changes. Requests with an older
nonce are stale and ignored. Two Envoy quirks are handled explicitly:
- after a CDS push Envoy re-requests EDS for the new clusters, possibly with the same version and nonce,
  and keeps the clusters warming until it is answered: the first EDS request after a CDS push is always
  answered (likewise RDS after LDS);
- the first request of a type on a new stream is always answered, so a restarted control plane resyncs
  Envoys even where versions happen to match.
After a CDS push, an EDS change is not pushed on its own but with the answer to that re-request, which
names the new cluster set; if no re-request comes within a short grace time, it is pushed anyway.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.metrics import ControlPlaneMetrics
from control_plane.xds.auth import XdsAuthenticator
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    SHORT_NAMES,
)
from control_plane.xds.snapshot import Snapshot

log = logging.getLogger(__name__)

# Types whose requests name the resources wanted; CDS and LDS are wildcard subscriptions here.
_NAMED_TYPES = (ENDPOINT, EXTENSION_CONFIG, ROUTE)
# A push of the key type makes Envoy re-request the value type, which must then be answered.
_DEPENDENTS = {CLUSTER: ENDPOINT, LISTENER: ROUTE}
# Envoy re-requests EDS after every CDS push (new or changed clusters re-subscribe); RDS only when the
# route configuration name changes, so only EDS pushes wait for the re-request.
_WAITS_FOR_REREQUEST = {ENDPOINT}
REREQUEST_GRACE_S = 2.0


class NodeRegistry(Protocol):
    """Told about Envoys as they come and go; makes sure the cache holds a snapshot for each."""

    def node_connected(self, node: base_pb2.Node) -> str:
        """Return the cache key of the node's snapshot, building it if needed."""

    def node_disconnected(self, node_key: str) -> None: ...


@dataclass
class _TypeState:
    subscribed: bool = False
    nonce: str = ""
    sent_version: str | None = None
    sent_names: tuple[str, ...] | None = None
    names: tuple[str, ...] = ()
    awaiting_ack: bool = False
    must_answer: bool = False
    hold_until: float = 0.0  # loop time before which a push waits for Envoy's re-request


class _Changed:
    """Queue marker: the node's snapshot changed."""


class _Closed:
    """Queue marker: Envoy closed its side of the stream."""


_CHANGED = _Changed()
_CLOSED = _Closed()
_Event: TypeAlias = discovery_pb2.DiscoveryRequest | _Changed | _Closed


class _SotwStream:
    def __init__(
        self, context: grpc.aio.ServicerContext, cache: SnapshotCache, metrics: ControlPlaneMetrics
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._context = context
        self._cache = cache
        self._metrics = metrics
        self._types = {t: _TypeState() for t in PUSH_ORDER}
        self._nonces = itertools.count(1)
        self._node_key = ""
        self._peer = context.peer()

    async def _respond(self, type_url: str, snapshot: Snapshot) -> None:
        state = self._types[type_url]
        resources = snapshot.packed(type_url)
        if type_url in _NAMED_TYPES and state.names:
            packed = [resources[n] for n in state.names if n in resources]
        else:
            packed = [resources[n] for n in sorted(resources)]
        nonce = str(next(self._nonces))
        version = snapshot.versions[type_url]
        await self._context.write(
            discovery_pb2.DiscoveryResponse(
                version_info=version, resources=packed, type_url=type_url, nonce=nonce
            )
        )
        state.nonce, state.sent_version, state.sent_names = nonce, version, state.names
        state.awaiting_ack, state.must_answer, state.hold_until = True, False, 0.0
        if type_url in _DEPENDENTS:
            dependent = _DEPENDENTS[type_url]
            self._types[dependent].must_answer = True
            if dependent in _WAITS_FOR_REREQUEST:
                self._types[dependent].hold_until = self._loop.time() + REREQUEST_GRACE_S
                self._loop.call_later(REREQUEST_GRACE_S, self._queue.put_nowait, _CHANGED)
        self._metrics.xds_pushes.labels(SHORT_NAMES[type_url]).inc()
        log.debug(
            "sent %s version %s (%d resources) nonce %s to %s",
            SHORT_NAMES[type_url],
            version,
            len(packed),
            nonce,
            self._node_key,
        )

    async def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        type_url = request.type_url
        if type_url not in self._types:
            log.warning("node %s asked for unsupported type %s", self._node_key, type_url)
            return
        snapshot = self._cache.get_snapshot(self._node_key)
        if snapshot is None:
            return
        state = self._types[type_url]
        if request.response_nonce and request.response_nonce != state.nonce:
            # Stale: answers a response that a newer one has superseded. Only the post-CDS EDS (post-LDS
            # RDS) re-request is served regardless, since Envoy waits on it to finish warming.
            if state.must_answer:
                state.names = tuple(sorted(request.resource_names))
                await self._respond(type_url, snapshot)
            return
        if request.response_nonce:
            state.awaiting_ack = False
            if state.sent_version is not None:
                error = request.error_detail.message if request.HasField("error_detail") else None
                self._cache.record_answer(self._node_key, type_url, state.sent_version, error)
            if request.HasField("error_detail"):
                if type_url in _DEPENDENTS:  # a rejected push triggers no re-request
                    dependent = self._types[_DEPENDENTS[type_url]]
                    dependent.must_answer, dependent.hold_until = False, 0.0
                self._metrics.xds_nacks.labels(SHORT_NAMES[type_url]).inc()
                log.error(
                    "node %s REJECTED %s version %s (keeps version %r): %s",
                    self._node_key,
                    SHORT_NAMES[type_url],
                    state.sent_version,
                    request.version_info,
                    request.error_detail.message,
                )
            else:
                log.debug(
                    "node %s acked %s version %s", self._node_key, SHORT_NAMES[type_url], request.version_info
                )
        state.subscribed = True
        state.names = tuple(sorted(request.resource_names))
        if (
            not request.response_nonce
            or state.must_answer
            or (type_url in _NAMED_TYPES and state.names != state.sent_names)
            or snapshot.versions[type_url] != state.sent_version
        ):
            await self._respond(type_url, snapshot)
        await self.catch_up()

    async def catch_up(self) -> None:
        """Push every subscribed type whose snapshot content differs from what this Envoy last got."""
        snapshot = self._cache.get_snapshot(self._node_key)
        if snapshot is None:
            return
        now = self._loop.time()
        for type_url in PUSH_ORDER:
            state = self._types[type_url]
            # While a response awaits its ACK the next push waits; the ACK handler sends it.
            if (
                state.subscribed
                and not state.awaiting_ack
                and now >= state.hold_until
                and snapshot.versions[type_url] != state.sent_version
            ):
                await self._respond(type_url, snapshot)

    async def run(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], nodes: NodeRegistry) -> None:
        queue = self._queue

        async def read() -> None:
            try:
                async for request in requests:
                    queue.put_nowait(request)
            finally:
                queue.put_nowait(_CLOSED)

        reader = asyncio.create_task(read())
        try:
            first = await queue.get()
            if not isinstance(first, discovery_pb2.DiscoveryRequest):
                return
            if not first.node.id:
                await self._context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id"
                )
            self._node_key = nodes.node_connected(first.node)
            log.info("envoy %s (cluster %s) connected from %s", first.node.id, first.node.cluster, self._peer)
            self._metrics.xds_connected.inc()
            try:
                with self._cache.watch(self._node_key, lambda: queue.put_nowait(_CHANGED)):
                    event: _Event = first
                    while True:
                        if isinstance(event, _Closed):
                            break
                        if isinstance(event, _Changed):
                            await self.catch_up()
                        else:
                            await self.on_request(event)
                        event = await queue.get()
            finally:
                self._cache.forget_answers(self._node_key)
                self._metrics.xds_connected.dec()
                nodes.node_disconnected(self._node_key)
                log.info("envoy %s disconnected", first.node.id)
        finally:
            reader.cancel()


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """ADS for every Envoy that presents its node's credential (`authenticator`; the control plane always
    passes one, only protocol tests run without)."""

    def __init__(
        self,
        cache: SnapshotCache,
        nodes: NodeRegistry,
        metrics: ControlPlaneMetrics,
        authenticator: XdsAuthenticator | None = None,
    ) -> None:
        self._cache = cache
        self._nodes = nodes
        self._metrics = metrics
        self._auth = authenticator

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        requests = request_iterator
        if self._auth is not None:
            # Refused streams end here: no node registered, no snapshot built, nothing sent.
            requests = await self._auth.admit("ads", request_iterator, context)
        await _SotwStream(context, self._cache, self._metrics).run(requests, self._nodes)

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this control plane serves state-of-the-world ADS")


def create_grpc_server(servicer: AdsServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """A gRPC server bound to `address` (host:port, port 0 = any); returns it and the bound port."""
    # SO_REUSEPORT off: otherwise a stale second control plane binds the same port and steals Envoys.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.keepalive_time_ms", 30_000)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind the xDS server to {address} (address in use?)")
    return server, port
