"""Upstream latency per model for the status page, from a Prometheus that scrapes the Envoys.

P50/P99 of Envoy's `envoy_cluster_upstream_rq_time` histogram per model cluster (`PrometheusLatency`);
`parse_quantile_vector` and `quantile_query` are the pure parts, tested on their own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import aiohttp

log = logging.getLogger(__name__)


class Latency(NamedTuple):
    p50_ms: float | None
    p99_ms: float | None


class LatencySource(Protocol):
    """Per-model upstream latency, e.g. from Prometheus. `describe()` is shown on the status page."""

    async def latency(self, clusters: Mapping[str, str]) -> dict[str, Latency]:
        """`clusters`: Envoy cluster name → model id. Returns model id → latency (missing: unknown)."""
        ...

    def describe(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def parse_quantile_vector(body: Mapping[str, Any], clusters: Mapping[str, str]) -> dict[str, float]:
    """A Prometheus `/api/v1/query` answer (instant vector by `envoy_cluster_name`) → model id → value.

    Series of clusters that are not models, and NaN/Inf values (no requests in the range), are left out.
    Raises ValueError for an answer that is not a successful vector.
    """
    if body.get("status") != "success":
        raise ValueError(f"Prometheus answered {body.get('errorType', 'error')}: {body.get('error', '?')}")
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        raise ValueError(f"expected a vector, Prometheus answered a {data.get('resultType')!r}")
    values: dict[str, float] = {}
    for series in data.get("result") or []:
        model_id = clusters.get(str((series.get("metric") or {}).get("envoy_cluster_name", "")))
        if model_id is None:
            continue
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            values[model_id] = value
    return values


def quantile_query(quantile: float, window: str = "1m") -> str:
    return (
        f"histogram_quantile({quantile}, sum by (envoy_cluster_name, le) "
        f'(rate(envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name=~"model_.+"}}[{window}])))'
    )


class PrometheusLatency:
    """P50/P99 of Envoy's upstream request time per model cluster, from a Prometheus scraping the Envoys.

    Envoy's histogram is in milliseconds and covers the whole upstream request (a stream until its end).
    `window`: the rate range; it should span a few scrape intervals.
    """

    def __init__(
        self,
        url: str,
        *,
        window: str = "1m",
        timeout_s: float = 1.5,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.window = window
        self.timeout_s = timeout_s
        self._session = session
        self._owns_session = session is None
        self.last_error: str | None = None
        self.last_success_at: float | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "source": "prometheus",
            "url": self.url,
            "window": self.window,
            "metric": "envoy_cluster_upstream_rq_time",
            "error": self.last_error,
        }

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _query(self, query: str, clusters: Mapping[str, str]) -> dict[str, float]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self._client().get(
            f"{self.url}/api/v1/query", params={"query": query}, timeout=timeout, allow_redirects=False
        ) as response:
            if response.status != 200 and response.content_type != "application/json":
                raise ValueError(f"HTTP {response.status}")
            body = await response.json(content_type=None)
        return parse_quantile_vector(body, clusters)

    async def latency(self, clusters: Mapping[str, str]) -> dict[str, Latency]:
        try:
            p50, p99 = await asyncio.gather(
                self._query(quantile_query(0.5, self.window), clusters),
                self._query(quantile_query(0.99, self.window), clusters),
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            message = f"timed out after {self.timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            message = message or type(exc).__name__
            if self.last_error is None:
                log.warning("status page: latency from Prometheus %s unavailable: %s", self.url, message)
            self.last_error = message
            return {}
        if self.last_error is not None:
            log.info("status page: latency from Prometheus %s available again", self.url)
        self.last_error = None
        self.last_success_at = time.time()
        return {
            model_id: Latency(p50_ms=p50.get(model_id), p99_ms=p99.get(model_id)) for model_id in {*p50, *p99}
        }
