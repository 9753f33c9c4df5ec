"""Errors Envoy answers itself, counted per model and code (gRPC access log service, ALS).

Envoy's cluster stats see only requests that reached a model's cluster; a 404 for an unknown model, a 503 of
a disabled or draining model, a 400, 405, 408 or 413 never do, and even those that do (503 no healthy
endpoint, overloaded, 504) carry no cause there. So every Envoy streams the error replies it makes itself to
the control plane (`envoy.access_loggers.http_grpc`, filtered to local replies, see
builders/access_log.py) over the ADS connection's cluster; this servicer hands every entry to its sinks
(this module's counter, and xds/generate_log.py's for /v1/generate calls, which share the stream). Here:

    llm_gateway_local_replies_total{model, code, status, stage}

- `model`: the model id the request named (an alias counts for its model); a name no model has is
  `(unknown)` and a request naming none (or not a string) is `(none)`, so the label stays bounded whatever
  clients send.
- `code`: the `error.code` the client got, read from the `x-gateway-error-code` header the local reply
  mapper sets (builders/local_reply.py: one rule table decides the body, the header and so this label);
  `gateway_error` for a reply no rule matched.
- `stage`: `upstream` when the reply came from the router at the model's cluster (its rule matches Envoy
  response flags: no healthy upstream, overflow, timeouts, failures); Envoy's cluster stats
  (envoy_cluster_upstream_rq_xx) count those already. `route`: answered before any cluster (route table,
  buffer, timeouts of the client side); in no Envoy stat per model. Recording rules add only `route`.

The stream is authenticated with the deployment's access-log credential (`xds/auth.py`, the same check
as ADS and LRS but not bound to a node, so every Envoy's listener stays the same). Envoy buffers
entries and flushes them every second, and drops them rather than block requests if this stream lags.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from control_plane.config.schema import Registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.xds.auth import XdsAuthenticator
from control_plane.xds.builders.local_reply import ERROR_CODE_HEADER, FALLBACK_CODE, reply_rules
from control_plane.xds.builders.shedding import SHED_NAMESPACE
from control_plane.xds.log_entries import NO_MODEL, UNKNOWN_MODEL, ModelNames

log = logging.getLogger(__name__)

_MAX_CODE_LENGTH = 64  # the header is ours, but bound what becomes a label all the same


def reply_code(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """The error code the client got (the local reply mapper's header), or the fallback code."""
    code = entry.response.response_headers.get(ERROR_CODE_HEADER, "") or FALLBACK_CODE
    if len(code) > _MAX_CODE_LENGTH or not code.replace("_", "").isalnum():
        return FALLBACK_CODE
    return code


class EntrySink(Protocol):
    """A counter fed by the access-log stream; it ignores the entries that are not its own."""

    def record(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> object: ...


@dataclass(frozen=True)
class LocalReply:
    model: str  # a model id, UNKNOWN_MODEL or NO_MODEL
    code: str
    status: int
    stage: str  # "route" or "upstream"
    reached_endpoint: bool  # an upstream host was picked: the endpoint's load reports count it too


class LocalReplyCounter:
    """Maps access-log entries to (model, code) with the registry's names and the reply rule table."""

    def __init__(self, metrics: ControlPlaneMetrics, registry: Registry) -> None:
        self._metrics = metrics
        self._names = ModelNames(registry)
        self._upstream_codes: frozenset[str] = frozenset()
        # Per model id: 5xx replies that reached no endpoint (so no load report has them), for the status
        # page's error figures. Totals since start, like the load reports' counters.
        self._unreported_errors: dict[str, int] = defaultdict(int)
        self.follow_registry(registry)

    def follow_registry(self, registry: Registry) -> None:
        self._names.follow_registry(registry)
        rules = reply_rules(registry.gateway)
        self._upstream_codes = frozenset(rule.code for rule in rules if rule.flags)

    async def follow(self, registry: Registry) -> None:
        """A registry listener (ControlPlane.add_registry_listener)."""
        self.follow_registry(registry)

    @staticmethod
    def wanted(entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
        """The stream carries other entries too (/v1/generate calls): LOCAL_REPLY_FILTER again."""
        response = entry.response
        return response.response_code.value >= 400 and response.response_code_details != "via_upstream"

    def classify(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> LocalReply:
        common = entry.common_properties
        code = reply_code(entry)
        # A request shed by priority has the circuit breaker's code but never reached a cluster.
        shed = SHED_NAMESPACE in common.metadata.filter_metadata
        return LocalReply(
            model=self._names.label(entry),
            code=code,
            status=entry.response.response_code.value,
            stage="upstream" if code in self._upstream_codes and not shed else "route",
            reached_endpoint=common.HasField("upstream_remote_address"),
        )

    def record(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> LocalReply | None:
        if not self.wanted(entry):
            return None
        reply = self.classify(entry)
        self._metrics.local_replies.labels(reply.model, reply.code, str(reply.status), reply.stage).inc()
        known = reply.model not in (UNKNOWN_MODEL, NO_MODEL)
        if reply.status >= 500 and not reply.reached_endpoint and known:
            self._unreported_errors[reply.model] += 1
        return reply

    def unreported_errors(self) -> Mapping[str, int]:
        """Model id → 5xx replies Envoy made without reaching an endpoint, since start."""
        return dict(self._unreported_errors)


@runtime_checkable
class LiveSink(Protocol):
    """A sink that also takes the periodic entries of requests in flight (the keys' live state,
    tenancy/live.py), told which Envoy's stream each entry came on and when that stream ends."""

    def record_live(self, entry: accesslog_pb2.HTTPAccessLogEntry, stream: str) -> object: ...

    def stream_ended(self, stream: str) -> None: ...


_PERIODIC = accesslog_pb2.AccessLogType.DownstreamPeriodic


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    """Hands every entry to its sinks. Periodic entries (requests still in flight, logged every half
    second with API keys on: builders/access_log.py) go only to the live sinks: every other sink counts a
    request once, at its end."""

    def __init__(
        self, sinks: Sequence[EntrySink | LiveSink], authenticator: XdsAuthenticator | None = None
    ) -> None:
        self._live: tuple[LiveSink, ...] = tuple(s for s in sinks if isinstance(s, LiveSink))
        self._sinks: tuple[EntrySink, ...] = tuple(s for s in sinks if not isinstance(s, LiveSink))
        self._auth = authenticator
        self._streams = itertools.count(1)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        messages = request_iterator
        if self._auth is not None:
            # Checked like ADS and LRS before anything is counted, with the deployment's access-log
            # credential (the one the listener carries, see xds/auth.py).
            messages = await self._auth.admit(
                "als", messages, context, node_bound=False, node_of=lambda m: m.identifier.node.id
            )
        stream = f"{context.peer()}#{next(self._streams)}"
        try:
            async for message in messages:
                for entry in message.http_logs.log_entry:
                    for live in self._live:
                        live.record_live(entry, stream)
                    if entry.common_properties.access_log_type == _PERIODIC:
                        continue
                    for sink in self._sinks:
                        sink.record(entry)
        finally:
            for live in self._live:
                live.stream_ended(stream)
        return als_pb2.StreamAccessLogsResponse()


def add_als_servicer(server: grpc.aio.Server, servicer: AccessLogServicer) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
