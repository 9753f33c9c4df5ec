"""TelemetryScraper and TelemetryCollector against simulated model servers started in-process."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from backends.simulator.app import build_app, engine_of, start_server
from backends.simulator.config import make_config
from backends.simulator.engine import Engine
from control_plane.config.schema import Registry
from control_plane.telemetry.errors import ScrapeError, TelemetryError
from control_plane.telemetry.scraper import (
    ScrapeTarget,
    TelemetryCollector,
    TelemetryScraper,
    metrics_url,
    targets_from_registry,
)
from control_plane.telemetry.signals import EndpointSignals

pytestmark = pytest.mark.unit

MIB = 1024 * 1024


class Sim:
    def __init__(self, url: str, engine: Engine) -> None:
        self.url = url
        self.engine = engine


@asynccontextmanager
async def run_sim(engine: str, endpoint_id: str, **overrides: Any) -> AsyncIterator[Sim]:
    kwargs: dict[str, Any] = {"profile": "fast"}
    kwargs.update(overrides)
    app = build_app(make_config(engine, "m", endpoint_id, **kwargs), exit_process=lambda code: None)
    server = await start_server(app, "127.0.0.1", 0)
    try:
        yield Sim(server.url, engine_of(app))
    finally:
        await server.stop()


@asynccontextmanager
async def run_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def refused_url() -> str:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def chat(session: aiohttp.ClientSession, url: str, max_tokens: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.read()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_metrics_url_and_targets_from_registry():
    assert metrics_url("http://10.0.0.7:8000") == "http://10.0.0.7:8000/metrics"
    assert metrics_url("http://10.0.0.7:8000/") == "http://10.0.0.7:8000/metrics"
    registry = Registry.model_validate(
        {
            "models": [
                {
                    "id": "llama3",
                    "engine": "vllm",
                    "endpoints": [{"url": "http://10.0.0.7:8000"}, {"id": "b", "url": "http://h:9000"}],
                },
                {"id": "emb", "engine": "tei", "enabled": False, "endpoints": [{"url": "http://e:80"}]},
            ]
        }
    )
    assert targets_from_registry(registry) == [
        ScrapeTarget("llama3-0", "http://10.0.0.7:8000/metrics", "vllm"),
        ScrapeTarget("b", "http://h:9000/metrics", "vllm"),
        ScrapeTarget("emb-0", "http://e:80/metrics", "tei"),
    ]
    assert [t.endpoint_id for t in targets_from_registry(registry, include_disabled=False)] == [
        "llama3-0",
        "b",
    ]


def test_scrape_a_loaded_simulator():
    async def main() -> None:
        async with (
            run_sim("vllm", "v-0", max_batch=2, decode_ms_per_token=20.0) as sim,
            TelemetryScraper(timeout_s=2.0) as scraper,
            aiohttp.ClientSession() as client,
        ):
            idle = await scraper.scrape(f"{sim.url}/metrics", "vllm")
            assert (idle.queue_depth, idle.running, idle.kv_cache_usage) == (0, 0, 0)
            assert idle.gpu_utilization == 0 and idle.gpu_memory_used_bytes == 8 * 1024 * MIB

            requests = [asyncio.ensure_future(chat(client, sim.url, 10)) for _ in range(5)]
            await wait_for(lambda: sim.engine.queue_size == 3)
            busy = await scraper.scrape(f"{sim.url}/metrics", "vllm", previous=idle)
            assert (busy.queue_depth, busy.running) == (3, 2)
            assert busy.kv_cache_usage is not None and busy.kv_cache_usage > 0
            assert busy.gpu_utilization == 1.0  # batch full
            assert busy.scraped_at > idle.scraped_at

            await asyncio.gather(*requests)
            done = await scraper.scrape(f"{sim.url}/metrics", "vllm", previous=busy)
            # Five requests of 10 tokens at ~20 ms a token: mean latencies from the histogram deltas.
            assert done.time_per_token_seconds_mean == pytest.approx(0.02, rel=0.5)
            assert done.e2e_seconds_mean is not None and done.e2e_seconds_mean > 0.18
            assert done.ttft_seconds_mean is not None

    asyncio.run(main())


def test_scrape_failures_are_scrape_errors():
    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="tgi_queue_size 1\n")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>")

    async def huge(request: web.Request) -> web.Response:
        return web.Response(text="tgi_queue_size 1\n" * 10_000)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            scraper = await stack.enter_async_context(TelemetryScraper(timeout_s=0.2, max_bytes=64 * 1024))
            urls = {
                name: await stack.enter_async_context(run_app(h))
                for name, h in [
                    ("not_found", not_found),
                    ("slow", slow),
                    ("garbage", garbage),
                    ("huge", huge),
                ]
            }
            expected = {
                "not_found": "HTTP 404",
                "slow": "timed out after 0.2 s",
                "garbage": "not Prometheus text exposition",
                "huge": "larger than 65536 bytes",
            }
            for name, url in urls.items():
                with pytest.raises(ScrapeError, match=expected[name]):
                    await scraper.scrape(f"{url}/metrics", "tgi")
            with pytest.raises(ScrapeError, match="ClientConnectorError"):
                await scraper.scrape(f"{refused_url()}/metrics", "tgi")
            async with run_sim("tgi", "t-0") as sim:
                with pytest.raises(ScrapeError, match="no metric mapping for engine 'nope'"):
                    await scraper.scrape(f"{sim.url}/metrics", "nope")

    asyncio.run(main())


def test_injected_session_is_not_closed():
    async def main() -> None:
        async with run_sim("tgi", "t-0") as sim, aiohttp.ClientSession() as session:
            scraper = TelemetryScraper(session=session)
            signals = await scraper.scrape(f"{sim.url}/metrics", "tgi")
            assert signals.queue_depth == 0
            await scraper.close()
            assert not session.closed

    asyncio.run(main())


def test_collector_scrapes_every_target_and_records_a_dead_one():
    updates: list[dict[str, EndpointSignals]] = []

    async def main() -> None:
        async with (
            run_sim("vllm", "v-0") as vllm,
            run_sim("tgi", "t-0") as tgi,
            run_sim("sglang", "s-0") as sglang,
            TelemetryScraper(timeout_s=1.0) as scraper,
        ):
            dead = refused_url()
            targets = [
                ScrapeTarget("v-0", metrics_url(vllm.url), "vllm"),
                ScrapeTarget("t-0", metrics_url(tgi.url), "tgi"),
                ScrapeTarget("dead-0", metrics_url(dead), "vllm"),
                # GPU metrics from another URL (here the vLLM simulator's DCGM gauges).
                ScrapeTarget("s-0", metrics_url(sglang.url), "sglang", gpu_metrics_url=metrics_url(vllm.url)),
                # A GPU exporter that is down: engine signals are kept, the failure is recorded.
                ScrapeTarget("s-1", metrics_url(sglang.url), "sglang", gpu_metrics_url=metrics_url(dead)),
            ]
            collector = TelemetryCollector(
                scraper, lambda: targets, max_concurrency=2, on_update=updates.append
            )
            latest = await collector.run_once()

            assert set(latest) == {"v-0", "t-0", "s-0", "s-1"}
            assert latest["v-0"].kv_cache_usage == 0 and latest["t-0"].queue_depth == 0
            assert latest["s-0"].gpu_memory_used_bytes == 8 * 1024 * MIB
            assert latest["s-1"].queue_depth == 0 and latest["s-1"].gpu_memory_used_bytes is None
            for ok in ("v-0", "t-0", "s-0"):
                assert collector.last_error(ok) is None
            failure = collector.last_error("dead-0")
            assert failure is not None and failure.consecutive == 1
            assert "ClientConnectorError" in failure.message and failure.url == metrics_url(dead)
            gpu_failure = collector.last_error("s-1")
            assert gpu_failure is not None and gpu_failure.url == metrics_url(dead)
            assert updates == [latest]

            await collector.run_once()
            again = collector.last_error("dead-0")
            assert again is not None and again.consecutive == 2
            assert collector.rounds == 2 and len(updates) == 2

            # A target that leaves the list is forgotten; one that recovers has its error cleared.
            targets[:] = [
                ScrapeTarget("v-0", metrics_url(vllm.url), "vllm"),
                ScrapeTarget("dead-0", metrics_url(tgi.url), "tgi"),
            ]
            latest = await collector.run_once()
            assert set(latest) == {"v-0", "dead-0"}
            assert collector.errors() == {}

    asyncio.run(main())


def test_collector_keeps_the_previous_signals_when_a_scrape_fails():
    async def main() -> None:
        async with TelemetryScraper(timeout_s=1.0) as scraper:
            async with run_sim("tgi", "t-0") as sim:
                target = ScrapeTarget("t-0", metrics_url(sim.url), "tgi")
                collector = TelemetryCollector(scraper, lambda: [target])
                first = (await collector.run_once())["t-0"]
            # The server is gone: the signals stay (and will age), the failure is recorded.
            second = await collector.run_once()
            assert second["t-0"] == first
            assert collector.last_error("t-0") is not None

    asyncio.run(main())


def test_collector_loop_runs_rounds_until_stopped():
    async def main() -> None:
        rounds = asyncio.Event()
        seen: list[int] = []

        async def on_update(latest: dict[str, EndpointSignals]) -> None:
            seen.append(len(latest))
            if len(seen) >= 3:
                rounds.set()

        async with run_sim("tei", "e-0") as sim, TelemetryScraper() as scraper:
            collector = TelemetryCollector(
                scraper,
                lambda: [ScrapeTarget("e-0", metrics_url(sim.url), "tei")],
                interval_s=0.02,
                jitter=0.5,
                on_update=on_update,
            )
            task = collector.start()
            assert collector.start() is task  # idempotent
            await asyncio.wait_for(rounds.wait(), 5)
            await collector.stop()
            assert task.cancelled()
            assert seen[:3] == [1, 1, 1]
            assert collector.latest()["e-0"].queue_depth == 0

    asyncio.run(main())


def test_collector_survives_a_broken_target_list_and_callback():
    calls = 0

    def targets() -> list[ScrapeTarget]:
        nonlocal calls
        calls += 1
        raise RuntimeError("registry unavailable")

    def on_update(latest: dict[str, EndpointSignals]) -> None:
        raise RuntimeError("callback bug")

    async def main() -> None:
        async with TelemetryScraper() as scraper:
            collector = TelemetryCollector(scraper, targets, on_update=on_update)
            assert await collector.run_once() == {}
            broken_callback = TelemetryCollector(scraper, lambda: [], on_update=on_update)
            assert await broken_callback.run_once() == {}

    asyncio.run(main())
    assert calls == 1


def test_collector_fetches_a_shared_gpu_exporter_once_per_round():
    hits = 0
    dcgm = 'DCGM_FI_DEV_GPU_UTIL{gpu="0"} 50\nDCGM_FI_DEV_GPU_UTIL{gpu="1"} 100\n'

    async def exporter(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(text=dcgm)

    async def main() -> None:
        async with run_sim("vllm", "v-0") as sim, run_app(exporter) as gpu_url, TelemetryScraper() as scraper:
            targets = [
                ScrapeTarget("v-0", metrics_url(sim.url), "vllm", metrics_url(gpu_url), (("gpu", "0"),)),
                ScrapeTarget("v-1", metrics_url(sim.url), "vllm", metrics_url(gpu_url), (("gpu", "1"),)),
            ]
            latest = await TelemetryCollector(scraper, lambda: targets).run_once()
            assert latest["v-0"].gpu_utilization == 0.5
            assert latest["v-1"].gpu_utilization == 1.0
            assert hits == 1
            # The one-off path does the same for one target.
            one = await scraper.scrape_target(targets[1])
            assert one.gpu_utilization == 1.0 and one.queue_depth == 0

    asyncio.run(main())


def test_collector_arguments_are_checked():
    scraper = TelemetryScraper()
    for kwargs in ({"interval_s": 0}, {"jitter": 1.0}, {"max_concurrency": 0}):
        with pytest.raises(ValueError):
            TelemetryCollector(scraper, list, **kwargs)
    with pytest.raises(ValueError):
        TelemetryScraper(timeout_s=0)
    collector = TelemetryCollector(scraper, list, interval_s=2.0, jitter=0.1)
    delays = [collector.next_delay() for _ in range(200)]
    assert all(1.8 <= d <= 2.2 for d in delays) and len(set(delays)) > 1
    assert issubclass(ScrapeError, TelemetryError)


def test_an_unexpected_error_is_recorded_not_raised():
    class Broken(TelemetryScraper):
        async def fetch_text(self, url: str) -> str:
            raise KeyError("bug")

    async def main() -> None:
        async with Broken() as scraper:
            collector = TelemetryCollector(
                scraper, lambda: [ScrapeTarget("x", "http://127.0.0.1:1/metrics", "tgi")]
            )
            assert await collector.run_once() == {}
            failure = collector.last_error("x")
            assert failure is not None and "unexpected KeyError" in failure.message

    asyncio.run(main())
