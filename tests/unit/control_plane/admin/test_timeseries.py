"""The status page's time series: rates from LRS counters, the ring buffer, columns, Prometheus latency."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from control_plane.admin.latency import Latency, PrometheusLatency, parse_quantile_vector, quantile_query
from control_plane.admin.timeseries import (
    Counts,
    ModelPoint,
    Sample,
    Target,
    TimeSeriesSampler,
    columns,
    engine_figures,
    model_targets,
    rates,
    read_counts,
)
from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.lrs import EndpointSample, LoadReportStore
from control_plane.xds.resources import cluster_name

pytestmark = pytest.mark.unit

A = "127.0.0.1:9001"
B = "127.0.0.1:9002"
C = "127.0.0.1:9003"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def plane() -> ControlPlane:
    registry = parse_registry(
        {
            "models": [
                {
                    "id": "qwen2",
                    "engine": "tgi",
                    "endpoints": [{"url": f"http://{A}"}, {"url": f"http://{B}"}],
                },
                {
                    "id": "org/llama3",
                    "engine": "vllm",
                    "endpoints": [{"id": "llama3-0", "url": f"http://{C}"}],
                },
            ]
        }
    )
    return ControlPlane(
        registry, cache=SnapshotCache(), metrics=ControlPlaneMetrics.create(), resolver=lambda host: host
    )


def report(store: LoadReportStore, cluster: str, address: str, **figures: int) -> None:
    store.record("envoy-1", [EndpointSample(cluster=cluster, address=address, **figures)])


# Pure arithmetic
def test_targets_are_each_models_cluster_and_addresses() -> None:
    targets = model_targets(plane().state)
    assert list(targets) == ["qwen2", "org/llama3"]
    assert targets["qwen2"] == Target(cluster="model_qwen2", addresses=(A, B))
    # Ids that are not safe in stat names get the same sanitised cluster name as in the xDS resources.
    assert targets["org/llama3"].cluster == cluster_name("org/llama3") != "model_org/llama3"


def test_rates_from_two_readings() -> None:
    before = {A: Counts(issued=10, successful=8, errors=1, in_flight=1), B: Counts(issued=5, successful=5)}
    after = {A: Counts(issued=30, successful=26, errors=3, in_flight=2), B: Counts(issued=9, successful=9)}
    point = rates(before, after, dt_s=2.0)
    assert point.qps == pytest.approx((20 + 4) / 2)
    assert point.error_qps == pytest.approx(1.0)
    assert point.answered_qps == pytest.approx((18 + 2 + 4) / 2)
    assert point.error_ratio == pytest.approx(2 / (18 + 2 + 4))
    assert point.in_flight == 2


def test_first_reading_and_new_endpoints_are_baselines() -> None:
    now = {A: Counts(issued=100, successful=100, in_flight=3)}
    assert rates(None, now, 2.0) == ModelPoint(in_flight=3)  # no rates without a previous reading
    later = {**now, B: Counts(issued=50, successful=50)}  # B appeared: its first reading is a baseline
    assert rates(now, later, 2.0).qps == 0.0


def test_counters_going_down_count_as_no_change() -> None:
    # The store drops an Envoy that left an hour ago: totals shrink; that is not negative traffic.
    point = rates(
        {A: Counts(issued=100, successful=90, errors=10)}, {A: Counts(issued=40, successful=40)}, 2.0
    )
    assert point.qps == 0.0 and point.error_qps == 0.0 and point.error_ratio is None


def test_no_answered_request_means_no_error_ratio() -> None:
    point = rates({A: Counts(issued=1)}, {A: Counts(issued=3, in_flight=2)}, 2.0)
    assert point.qps == 1.0 and point.error_ratio is None and point.in_flight == 2
    assert rates({A: Counts()}, {A: Counts()}, 0.0) == ModelPoint(in_flight=0)


def test_read_counts_keeps_models_apart_on_a_shared_address() -> None:
    store = LoadReportStore()
    store.node_connected("envoy-1")
    store.record(
        "envoy-1",
        [
            EndpointSample(cluster="model_a", address=A, issued=5, successful=4, errors=1, in_progress=2),
            EndpointSample(cluster="model_b", address=A, issued=7, successful=7),
        ],
    )
    counts = read_counts(
        store, {"a": Target("model_a", (A,)), "b": Target("model_b", (A,)), "c": Target("model_c", (B,))}
    )
    assert counts["a"][A] == Counts(issued=5, successful=4, errors=1, in_flight=2)
    assert counts["b"][A] == Counts(issued=7, successful=7, errors=0, in_flight=0)
    assert counts["c"][B] == Counts()  # nothing reported yet


def test_parse_quantile_vector() -> None:
    body = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"envoy_cluster_name": "model_qwen2"}, "value": [1.0, "41.5"]},
                {"metric": {"envoy_cluster_name": "model_llama3"}, "value": [1.0, "NaN"]},  # no requests
                {"metric": {"envoy_cluster_name": "xds_cluster"}, "value": [1.0, "3"]},  # not a model
                {"metric": {}, "value": [1.0, "7"]},
            ],
        },
    }
    clusters = {"model_qwen2": "qwen2", "model_llama3": "llama3"}
    assert parse_quantile_vector(body, clusters) == {"qwen2": 41.5}
    with pytest.raises(ValueError, match="bad_data"):
        parse_quantile_vector({"status": "error", "errorType": "bad_data", "error": "parse error"}, clusters)
    with pytest.raises(ValueError, match="matrix"):
        parse_quantile_vector({"status": "success", "data": {"resultType": "matrix", "result": []}}, clusters)


def test_quantile_query_reads_envoys_histogram_per_cluster() -> None:
    query = quantile_query(0.99, "2m")
    assert query.startswith("histogram_quantile(0.99, sum by (envoy_cluster_name, le) (rate(")
    assert 'envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=~"model_.+"}[2m]' in query
    assert query.count("(") == query.count(")")


def test_columns_fill_gaps_and_keep_the_registry_order() -> None:
    samples = [
        Sample(t=1.0, models={"b": ModelPoint(qps=1.0, in_flight=0)}),
        Sample(
            t=3.0, models={"a": ModelPoint(qps=2.0, error_ratio=0.123456, in_flight=1), "b": ModelPoint()}
        ),
    ]
    out = columns(samples, ["a", "b", "gone"], with_latency=False)
    assert out["t"] == [1.0, 3.0]
    assert list(out["models"]) == ["a", "b"]  # a model never sampled is left out
    assert out["models"]["a"] == {
        "qps": [None, 2.0],
        "answered_qps": [None, None],
        "error_qps": [None, None],
        "error_ratio": [None, 0.1235],
        "in_flight": [None, 1],
    }
    assert "p99_ms" in columns(samples, ["a"], with_latency=True)["models"]["a"]
    assert "ttft_ms" not in out["models"]["a"]
    assert {"ttft_ms", "tokens_per_s"} <= set(columns(samples, ["a"], False, with_engine=True)["models"]["a"])
    # A model sampled in the window but no longer configured (removed) is not charted.
    assert list(columns(samples, ["b"], with_latency=False)["models"]) == ["b"]


@dataclass(frozen=True)
class Signals:
    scraped_at: float
    ttft_seconds_mean: float | None = None
    time_per_token_seconds_mean: float | None = None


def test_engine_figures_average_fresh_endpoints_per_model() -> None:
    state = plane().state
    qwen_a, qwen_b = (e.id for e in state.models[0].endpoints)
    latest = {
        qwen_a: Signals(scraped_at=100.0, ttft_seconds_mean=0.2, time_per_token_seconds_mean=0.02),
        qwen_b: Signals(scraped_at=99.0, ttft_seconds_mean=0.4, time_per_token_seconds_mean=0.03),
        "llama3-0": Signals(scraped_at=80.0, ttft_seconds_mean=9.0, time_per_token_seconds_mean=1.0),  # stale
        "gone-0": Signals(scraped_at=100.0, ttft_seconds_mean=1.0),  # not an endpoint of any model
    }
    figures = engine_figures(state, latest, now=100.0, max_age_s=10.0)
    assert set(figures) == {"qwen2", "org/llama3"}
    assert figures["qwen2"].ttft_ms == pytest.approx(300.0)
    assert figures["qwen2"].tokens_per_s == pytest.approx(1 / 0.025)
    assert figures["org/llama3"] == (None, None)
    # An engine that exports no TTFT (TGI) keeps TTFT unknown, tokens per second known.
    tgi = {qwen_a: Signals(scraped_at=100.0, time_per_token_seconds_mean=0.05)}
    assert engine_figures(state, tgi, 100.0, 10.0)["qwen2"] == (None, pytest.approx(20.0))


# The sampler
def test_sampler_turns_reports_into_a_window_of_rates() -> None:
    gateway = plane()
    store = LoadReportStore()
    store.node_connected("envoy-1")
    mono, wall = Clock(100.0), Clock(1_700_000_000.0)
    sampler = TimeSeriesSampler(gateway, store, interval_s=2.0, window_s=10.0, clock=mono, wall_clock=wall)

    first = sampler.sample_once()
    assert first.models["qwen2"] == ModelPoint(in_flight=0)
    for step in range(1, 8):
        report(store, "model_qwen2", A, issued=10, successful=9, errors=1, in_progress=step)
        mono.t += 2.0
        wall.t += 2.0
        sampler.sample_once()
    assert len(sampler.samples) == 5  # window_s / interval_s: the oldest are gone
    last = sampler.samples[-1].models
    assert last["qwen2"].qps == pytest.approx(5.0) and last["qwen2"].error_ratio == pytest.approx(0.1)
    assert last["qwen2"].in_flight == 7
    assert last["org/llama3"].qps == 0.0

    out = sampler.to_json()
    assert out["interval_s"] == 2.0 and out["window_s"] == 10.0 and out["latency"] is None
    assert out["t"] == [1_700_000_000.0 + 2 * i for i in range(3, 8)]
    assert list(out["models"]) == ["qwen2", "org/llama3"]
    assert out["models"]["qwen2"]["in_flight"] == [3, 4, 5, 6, 7]
    assert "p99_ms" not in out["models"]["qwen2"]  # no latency source: no latency, not zeros
    assert sampler.to_json(window_s=4.0)["t"] == out["t"][-3:]


def test_engine_figures_in_samples_and_removed_models_leave_the_window() -> None:
    gateway = plane()
    store = LoadReportStore()
    store.node_connected("envoy-1")
    mono, wall = Clock(100.0), Clock(1_700_000_000.0)
    qwen_a = gateway.state.models[0].endpoints[0].id

    class Engines:
        def latest(self) -> dict[str, Any]:
            return {
                qwen_a: Signals(scraped_at=mono.t, ttft_seconds_mean=0.15, time_per_token_seconds_mean=0.01)
            }

    sampler = TimeSeriesSampler(gateway, store, engine=Engines(), clock=mono, wall_clock=wall)
    sampler.sample_once()
    out = sampler.to_json()
    assert out["engine"] == {"source": "telemetry", "max_age_s": 10.0}
    assert out["models"]["qwen2"]["ttft_ms"] == [150.0] and out["models"]["qwen2"]["tokens_per_s"] == [100.0]
    assert out["models"]["org/llama3"]["ttft_ms"] == [None]

    asyncio.run(gateway.apply_registry(parse_registry({"models": [gateway.registry.models[0].model_dump()]})))
    mono.t += 2.0
    sampler.sample_once()
    assert list(sampler.to_json()["models"]) == ["qwen2"]  # the removed model left the series at once


def test_sampler_rejects_a_window_shorter_than_the_interval() -> None:
    with pytest.raises(ValueError):
        TimeSeriesSampler(plane(), LoadReportStore(), interval_s=2.0, window_s=1.0)


class FakeLatency:
    def __init__(self) -> None:
        self.asked: list[dict[str, str]] = []
        self.closed = False

    async def latency(self, clusters: Any) -> dict[str, Latency]:
        self.asked.append(dict(clusters))
        return {"qwen2": Latency(p50_ms=12.0, p99_ms=80.0)}

    def describe(self) -> dict[str, Any]:
        return {"source": "fake", "error": None}

    async def close(self) -> None:
        self.closed = True


def test_the_loop_samples_with_latency_until_stopped() -> None:
    async def main() -> None:
        latency = FakeLatency()
        sampler = TimeSeriesSampler(plane(), LoadReportStore(), latency=latency, interval_s=0.05, window_s=5)
        sampler.start()
        for _ in range(100):
            if len(sampler.samples) >= 3:
                break
            await asyncio.sleep(0.02)
        await sampler.stop()
        count = len(sampler.samples)
        await asyncio.sleep(0.15)
        assert count >= 3 and len(sampler.samples) == count  # stopped means stopped
        assert latency.closed
        assert latency.asked[0] == {"model_qwen2": "qwen2", cluster_name("org/llama3"): "org/llama3"}
        out = sampler.to_json()
        assert out["latency"] == {"source": "fake", "error": None}
        assert out["models"]["qwen2"]["p99_ms"][-1] == 80.0 and out["models"]["qwen2"]["p50_ms"][-1] == 12.0
        assert out["models"]["org/llama3"]["p99_ms"][-1] is None

    asyncio.run(main())


# Prometheus
async def _prometheus(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/api/v1/query", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/"


def test_prometheus_latency_asks_both_quantiles() -> None:
    queries: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        query = request.query["query"]
        queries.append(query)
        value = "25" if query.startswith("histogram_quantile(0.5,") else "120.5"
        return web.json_response(
            {
                "status": "success",
                "data": {
                    "resultType": "vector",
                    "result": [{"metric": {"envoy_cluster_name": "model_qwen2"}, "value": [0, value]}],
                },
            }
        )

    async def main() -> None:
        runner, url = await _prometheus(handler)
        source = PrometheusLatency(url, window="2m")
        try:
            got = await source.latency({"model_qwen2": "qwen2", "model_llama3": "llama3"})
        finally:
            await source.close()
            await runner.cleanup()
        assert got == {"qwen2": Latency(p50_ms=25.0, p99_ms=120.5)}
        assert sorted(queries) == sorted([quantile_query(0.5, "2m"), quantile_query(0.99, "2m")])
        assert source.describe()["error"] is None and source.describe()["url"] == url.rstrip("/")

    asyncio.run(main())


def test_prometheus_failures_leave_latency_unknown_and_say_why() -> None:
    async def bad_query(request: web.Request) -> web.Response:
        return web.json_response({"status": "error", "errorType": "bad_data", "error": "boom"}, status=400)

    async def not_prometheus(request: web.Request) -> web.Response:
        return web.Response(text="<html>proxy error</html>", status=502, content_type="text/html")

    async def main() -> None:
        for handler, expected in ((bad_query, "bad_data"), (not_prometheus, "HTTP 502")):
            runner, url = await _prometheus(handler)
            source = PrometheusLatency(url)
            try:
                assert await source.latency({"model_qwen2": "qwen2"}) == {}
            finally:
                await source.close()
                await runner.cleanup()
            assert expected in (source.last_error or ""), source.last_error
        # Nothing listening at all.
        runner, url = await _prometheus(bad_query)
        await runner.cleanup()
        source = PrometheusLatency(url, timeout_s=1.0)
        try:
            assert await source.latency({"model_qwen2": "qwen2"}) == {}
        finally:
            await source.close()
        assert source.describe()["error"]

    asyncio.run(main())


def test_nan_never_reaches_the_json() -> None:
    sampler = TimeSeriesSampler(plane(), LoadReportStore())
    sampler.sample_once({"qwen2": Latency(p50_ms=None, p99_ms=None)})
    values = [v for figures in sampler.to_json()["models"].values() for vs in figures.values() for v in vs]
    assert all(v is None or math.isfinite(v) for v in values)
