"""Load reporting (LRS): Envoy tells the control plane how many requests are in flight per upstream endpoint.

Envoy opens `envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats` to the control plane (the
bootstrap's `cluster_manager.load_stats_config`). Its first message carries the node; the server answers
once with the clusters it wants (all), the interval, and endpoint granularity; from then on Envoy sends a
report every interval. In each report, per cluster, per locality, per endpoint (`upstream_endpoint_stats`):
- `total_requests_in_progress`: a gauge, the requests in flight at the time of the report;
- `total_successful_requests`, `total_error_requests`, `total_issued_requests`: counts since the previous
  report (deltas), which the store accumulates.
Envoy leaves out endpoints (and whole localities) with nothing to report, so an endpoint absent from a report
has 0 requests in flight on that node: every report replaces the node's in-flight figures as a whole.

`LoadReportStore` holds the latest figures per Envoy node and answers the queries (pure data, an injected
clock, asyncio futures to wait on; no I/O). `LoadReportingServicer` is the gRPC side.

Facts about Envoy (1.40) that matter to users of the store, checked against a real Envoy:
- an endpoint is reported only while Envoy has it in the cluster: an endpoint removed from EDS drops out of
  the reports at once (0 in flight) although its streams go on. An endpoint kept in EDS with health DRAINING
  keeps being reported until its requests end: to wait for a drained endpoint, keep it in EDS until
  `in_flight` says 0 (since every Envoy reported after the DRAINING push), and only then remove it;
- Envoy counts in-flight requests on its host objects: a cluster it replaces (any CDS change to it) and an
  endpoint whose EDS entry changes identity (its metadata, e.g. the endpoint id) get new ones, and the
  requests started on the old ones are no longer counted;
- a cluster created after the start of a report period is reported from the next period on (its requests
  of that first period are not counted);
- `total_successful_requests` / `total_error_requests` count a request when its response headers arrive
  (a 5xx is an error), so a stream counts as a success at its start: only `in_progress` sees it end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc
from google.protobuf import duration_pb2

from control_plane.xds.auth import XdsAuthenticator

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
DEFAULT_FORGET_GONE_AFTER_S = 3600.0


@dataclass(frozen=True)
class EndpointSample:
    """One endpoint's figures in one report: `in_progress` is a gauge, the rest are deltas."""

    cluster: str
    address: str  # "ip:port" (IPv6 unbracketed, as the admin API writes addresses), or a pipe path
    in_progress: int = 0
    successful: int = 0
    errors: int = 0
    issued: int = 0


@dataclass
class EndpointLoad:
    """An endpoint's load as one node last reported it: in flight now, and totals since first seen."""

    in_progress: int = 0
    successful_total: int = 0
    error_total: int = 0
    issued_total: int = 0


@dataclass
class _Node:
    streams: int = 0
    reported_at: float | None = None
    reported_since_connect: bool = False  # a report came since the node's streams went from 0 to 1
    gone_at: float | None = None
    reports: int = 0
    clusters: dict[str, dict[str, EndpointLoad]] = field(default_factory=dict)


def address_key(address: address_pb2.Address) -> str | None:
    """`"ip:port"` for a socket address, the path for a pipe; None for other kinds."""
    kind = address.WhichOneof("address")
    if kind == "socket_address":
        socket_address = address.socket_address
        return f"{socket_address.address}:{socket_address.port_value}"
    if kind == "pipe":
        return address.pipe.path
    return None


def samples_from_cluster_stats(cluster_stats: Iterable[load_report_pb2.ClusterStats]) -> list[EndpointSample]:
    """The per-endpoint figures of one LoadStatsRequest (locality-only figures cannot be attributed)."""
    samples = []
    for cluster in cluster_stats:
        for locality in cluster.upstream_locality_stats:
            for endpoint in locality.upstream_endpoint_stats:
                key = address_key(endpoint.address)
                if key is None:
                    log.debug("load report: endpoint without a usable address in %s", cluster.cluster_name)
                    continue
                samples.append(
                    EndpointSample(
                        cluster=cluster.cluster_name,
                        address=key,
                        in_progress=endpoint.total_requests_in_progress,
                        successful=endpoint.total_successful_requests,
                        errors=endpoint.total_error_requests,
                        issued=endpoint.total_issued_requests,
                    )
                )
            totals = locality.total_issued_requests + locality.total_requests_in_progress
            if totals and not locality.upstream_endpoint_stats:
                log.debug("load report for %s has locality totals only", cluster.cluster_name)
    return samples


class LoadReportStore:
    """Latest load per Envoy node, per cluster, per endpoint address; queries over the fresh nodes.

    A node is *fresh* while it has an open LRS stream and its last report is younger than `stale_after_s`
    (default: 3 report intervals). In-flight queries count fresh nodes only. Counters (`issued_total`, …)
    add up every report received since the control plane started, from every node still held, fresh or not;
    a node whose streams all ended is dropped `forget_gone_after_s` later (or at once by `forget`).
    """

    def __init__(
        self,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        stale_after_s: float | None = None,
        forget_gone_after_s: float = DEFAULT_FORGET_GONE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s if stale_after_s is not None else 3 * interval_s
        self.forget_gone_after_s = forget_gone_after_s
        self._clock = clock
        self._nodes: dict[str, _Node] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    def now(self) -> float:
        """The store's clock: the time base of `wait_for_report(after=...)` and of `reported_at`."""
        return self._clock()

    # Written by the LRS transport
    def node_connected(self, node_id: str) -> None:
        node = self._nodes.setdefault(node_id, _Node())
        if node.streams == 0:
            # Back after a gap (or new): what it has in flight is unknown until its next report.
            node.reported_since_connect = False
        node.streams += 1
        node.gone_at = None
        self._notify()

    def node_disconnected(self, node_id: str) -> None:
        """One stream of the node ended; with none left the node is gone (not fresh, nothing in flight)."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        node.streams = max(0, node.streams - 1)
        if node.streams == 0:
            node.gone_at = self._clock()
            for endpoints in node.clusters.values():
                for load in endpoints.values():
                    load.in_progress = 0
        self._prune()
        self._notify()

    def record(self, node_id: str, samples: Iterable[EndpointSample]) -> None:
        """One full report from a node: in-flight figures replace the previous ones, counters add up."""
        node = self._nodes.setdefault(node_id, _Node())
        in_progress: dict[tuple[str, str], int] = {}
        for sample in samples:
            endpoints = node.clusters.setdefault(sample.cluster, {})
            load = endpoints.setdefault(sample.address, EndpointLoad())
            load.successful_total += max(0, sample.successful)
            load.error_total += max(0, sample.errors)
            load.issued_total += max(0, sample.issued)
            key = (sample.cluster, sample.address)
            # The same endpoint may appear in two localities or priorities: its in-flight figures add up.
            in_progress[key] = in_progress.get(key, 0) + max(0, sample.in_progress)
        for cluster, endpoints in node.clusters.items():
            for address, load in endpoints.items():
                load.in_progress = in_progress.get((cluster, address), 0)
        node.reported_at = self._clock()
        node.reported_since_connect = True
        node.reports += 1
        self._prune()
        self._notify()

    def forget(self, node_id: str) -> None:
        """Drop everything known about a node."""
        if self._nodes.pop(node_id, None) is not None:
            self._notify()

    # Queries
    def _is_fresh(self, node: _Node, now: float) -> bool:
        return (
            node.streams > 0
            and node.reported_since_connect
            and node.reported_at is not None
            and now - node.reported_at < self.stale_after_s
        )

    def fresh_nodes(self) -> set[str]:
        now = self._clock()
        return {node_id for node_id, node in self._nodes.items() if self._is_fresh(node, now)}

    def known_nodes(self) -> set[str]:
        """Every node held: connected (reported or not yet) and gone but not yet forgotten."""
        return set(self._nodes)

    def last_report_age(self, node_id: str) -> float | None:
        """Seconds since the node's last report; None for an unknown node or one that has not reported."""
        node = self._nodes.get(node_id)
        if node is None or node.reported_at is None:
            return None
        return self._clock() - node.reported_at

    def reported_at(self, node_id: str) -> float | None:
        node = self._nodes.get(node_id)
        return None if node is None else node.reported_at

    def in_flight_by_node(self, address: str, cluster: str | None = None) -> dict[str, int]:
        """Requests in flight on the endpoint per fresh node (every fresh node is listed, 0 if none)."""
        now = self._clock()
        return {
            node_id: self._node_in_progress(node, address, cluster)
            for node_id, node in self._nodes.items()
            if self._is_fresh(node, now)
        }

    def in_flight(self, address: str, cluster: str | None = None) -> int:
        """Requests in flight on the endpoint (`"ip:port"`), summed over fresh nodes (and clusters)."""
        return sum(self.in_flight_by_node(address, cluster).values())

    def issued_total(self, address: str, cluster: str | None = None) -> int:
        return sum(self._totals(address, cluster, lambda load: load.issued_total))

    def successful_total(self, address: str, cluster: str | None = None) -> int:
        return sum(self._totals(address, cluster, lambda load: load.successful_total))

    def error_total(self, address: str, cluster: str | None = None) -> int:
        return sum(self._totals(address, cluster, lambda load: load.error_total))

    def addresses(self) -> set[str]:
        """Every endpoint address any held node has reported."""
        return {address for node in self._nodes.values() for eps in node.clusters.values() for address in eps}

    def reported_since(self, after: float) -> bool:
        """Whether every fresh node has reported after `after` (store clock); true when none is fresh."""
        now = self._clock()
        return all(
            node.reported_at is not None and node.reported_at > after
            for node in self._nodes.values()
            if self._is_fresh(node, now)
        )

    def snapshot(self) -> dict[str, object]:
        """Everything held, as plain JSON-ready data (for the admin API)."""
        now = self._clock()
        nodes: dict[str, object] = {}
        for node_id, node in sorted(self._nodes.items()):
            nodes[node_id] = {
                "fresh": self._is_fresh(node, now),
                "connected": node.streams > 0,
                "last_report_age_s": None if node.reported_at is None else round(now - node.reported_at, 3),
                "reports": node.reports,
                "clusters": {
                    cluster: {
                        address: {
                            "in_progress": load.in_progress,
                            "issued_total": load.issued_total,
                            "successful_total": load.successful_total,
                            "error_total": load.error_total,
                        }
                        for address, load in sorted(endpoints.items())
                    }
                    for cluster, endpoints in sorted(node.clusters.items())
                },
            }
        endpoints = {
            address: {
                "in_flight": self.in_flight(address),
                "in_flight_by_node": self.in_flight_by_node(address),
                "issued_total": self.issued_total(address),
                "successful_total": self.successful_total(address),
                "error_total": self.error_total(address),
            }
            for address in sorted(self.addresses())
        }
        return {
            "interval_s": self.interval_s,
            "stale_after_s": self.stale_after_s,
            "nodes": nodes,
            "endpoints": endpoints,
        }

    # Waiting
    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds, re-checked on every change and every interval (staleness moves
        with time alone); return False if `timeout_s` (event-loop time) passes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if predicate():
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.add(future)
            try:
                await asyncio.wait_for(future, timeout=min(remaining, self.interval_s))
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(future)

    async def wait_for_report(self, after: float, timeout_s: float) -> bool:
        """Wait until every fresh node has reported after `after` (a `now()` reading); False on timeout.

        For a drain: `t = store.now()` when DRAINING is pushed, then
        `await store.wait_until(lambda: store.reported_since(t) and store.in_flight(addr) == 0, timeout)`.
        """
        return await self.wait_until(lambda: self.reported_since(after), timeout_s)

    def _notify(self) -> None:
        for future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()

    def _prune(self) -> None:
        now = self._clock()
        for node_id in [
            node_id
            for node_id, node in self._nodes.items()
            if node.gone_at is not None and now - node.gone_at >= self.forget_gone_after_s
        ]:
            del self._nodes[node_id]

    def _node_in_progress(self, node: _Node, address: str, cluster: str | None) -> int:
        if cluster is not None:
            load = node.clusters.get(cluster, {}).get(address)
            return load.in_progress if load else 0
        return sum(eps[address].in_progress for eps in node.clusters.values() if address in eps)

    def _totals(self, address: str, cluster: str | None, get: Callable[[EndpointLoad], int]) -> list[int]:
        values = []
        for node in self._nodes.values():
            for name, endpoints in node.clusters.items():
                if (cluster is None or name == cluster) and address in endpoints:
                    values.append(get(endpoints[address]))
        return values


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


class LoadReportingServicer(lrs_pb2_grpc.LoadReportingServiceServicer):
    """The LRS endpoint: asks every Envoy for all clusters at endpoint granularity and records its reports."""

    def __init__(
        self,
        store: LoadReportStore,
        *,
        interval_s: float | None = None,
        on_report: Callable[[str], None] | None = None,
        authenticator: XdsAuthenticator | None = None,
    ) -> None:
        self._store = store
        self._interval_s = interval_s if interval_s is not None else store.interval_s
        self._on_report = on_report
        self._auth = authenticator

    async def StreamLoadStats(
        self,
        request_iterator: AsyncIterator[lrs_pb2.LoadStatsRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        requests = request_iterator
        if self._auth is not None:
            # An unauthenticated client's reports would set in_flight and hold drains: refuse the stream
            # before it is recorded anywhere.
            requests = await self._auth.admit("lrs", request_iterator, context)
        node_id = ""
        try:
            async for request in requests:
                if not node_id:
                    if not request.node.id:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id"
                        )
                    node_id = request.node.id
                    self._store.node_connected(node_id)
                    log.debug("load reports from %s (%s)", node_id, context.peer())
                    await context.write(
                        lrs_pb2.LoadStatsResponse(
                            send_all_clusters=True,
                            load_reporting_interval=_duration(self._interval_s),
                            report_endpoint_granularity=True,
                        )
                    )
                    # The first message of a fresh Envoy carries no figures (it has not been asked yet), so
                    # it says nothing about what is in flight; after a reconnect it carries a real report.
                    if not request.cluster_stats:
                        continue
                self._record(node_id, request)
        finally:
            if node_id:
                self._store.node_disconnected(node_id)
                log.debug("load report stream of %s ended", node_id)

    def _record(self, node_id: str, request: lrs_pb2.LoadStatsRequest) -> None:
        try:
            samples = samples_from_cluster_stats(request.cluster_stats)
            self._store.record(node_id, samples)
            log.debug("load report from %s: %d endpoint figures", node_id, len(samples))
            if self._on_report is not None:
                self._on_report(node_id)
        except Exception:
            log.exception("could not record a load report from %s", node_id)


def add_lrs_servicer(server: grpc.aio.Server, servicer: LoadReportingServicer) -> None:
    lrs_pb2_grpc.add_LoadReportingServiceServicer_to_server(servicer, server)
