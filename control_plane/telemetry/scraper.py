"""Scraping the model servers' /metrics: one scrape (``TelemetryScraper``) and the periodic loop
(``TelemetryCollector``).

Nothing runs at import time and nothing is global: the aiohttp session is injected or created on first
use (and then closed by ``close()``), the clock and the random source are injectable.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import aiohttp

from control_plane.background import BackgroundTask
from control_plane.lifecycle.targets import Launched, launched_endpoints
from control_plane.telemetry.errors import ScrapeError, TelemetryError
from control_plane.telemetry.metric_map import MetricMap, default_metric_map
from control_plane.telemetry.parse import gpu_signals_from_text, signals_from_text
from control_plane.telemetry.signals import EndpointSignals, GpuSignals

if TYPE_CHECKING:
    from control_plane.config.schema import Registry

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_INTERVAL_S = 2.0
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
"""A vLLM /metrics is some 100 KiB; an answer over this is refused rather than read."""
_ACCEPT = "text/plain;version=0.0.4;q=1.0,*/*;q=0.1"

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """One endpoint to scrape."""

    endpoint_id: str
    metrics_url: str
    """The engine's Prometheus endpoint, e.g. ``http://10.0.0.7:8000/metrics``."""
    engine: str
    """Engine kind, a key of the metric map (``tgi``, ``vllm``, ``sglang``, ``tei``)."""
    gpu_metrics_url: str | None = None
    """A separate DCGM exporter; ``None``: GPU metrics are read from ``metrics_url`` when present."""
    gpu_labels: tuple[tuple[str, str], ...] = ()
    """Keep only GPU samples with these labels (e.g. ``(("gpu", "0"),)`` on a shared exporter)."""


def metrics_url(base_url: str) -> str:
    """The /metrics URL of a model server's base URL (``http://host:port``)."""
    return base_url.rstrip("/") + "/metrics"


def targets_from_registry(
    registry: Registry, *, include_disabled: bool = True, launched: Launched | None = None
) -> list[ScrapeTarget]:
    """One target per endpoint of the registry: ``<url>/metrics``, the model's engine and, when the
    endpoint config has one, its ``gpu_metrics_url``; then one per ready replica of a launched model
    (``launched``: the control plane's ``inputs.launched``), scraped like any endpoint of its engine."""
    targets = []
    for model in registry.models:
        if not model.enabled and not include_disabled:
            continue
        for index, endpoint in enumerate(model.endpoints):
            gpu_url = getattr(endpoint, "gpu_metrics_url", None)
            targets.append(
                ScrapeTarget(
                    endpoint_id=model.endpoint_id(index),
                    metrics_url=metrics_url(endpoint.url),
                    engine=str(model.engine),
                    gpu_metrics_url=str(gpu_url) if gpu_url else None,
                )
            )
    for replica in launched_endpoints(registry, launched or {}):
        if replica.model.enabled or include_disabled:
            targets.append(ScrapeTarget(replica.id, metrics_url(replica.url), str(replica.model.engine)))
    return targets


class TelemetryScraper:
    """Fetches and parses one /metrics answer at a time.

    ``session``: an aiohttp session to use (not closed here); without one, a session is created on first
    use and closed by ``close()`` / ``async with``.
    """

    def __init__(
        self,
        metric_map: MetricMap | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Clock = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.metric_map = metric_map if metric_map is not None else default_metric_map()
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._session = session
        self._owns_session = session is None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise RuntimeError("the injected aiohttp session is closed")
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> TelemetryScraper:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def fetch_text(self, url: str) -> str:
        """The body of ``GET url``; ``ScrapeError`` on any failure, timeout or non-200 answer."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self._client().get(
                url, timeout=timeout, headers={"Accept": _ACCEPT}, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise ScrapeError(url, f"HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise ScrapeError(url, f"answer larger than {self.max_bytes} bytes")
        except TimeoutError:
            raise ScrapeError(url, f"timed out after {self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise ScrapeError(url, f"{type(exc).__name__}: {exc}") from None
        return body.decode("utf-8", errors="replace")

    async def scrape(
        self,
        url: str,
        engine: str,
        *,
        previous: EndpointSignals | None = None,
        gpu_labels: Mapping[str, str] | None = None,
    ) -> EndpointSignals:
        """Signals of the engine at ``url`` (GPU ones too, if that answer has them).

        ``previous``: this endpoint's previous signals, for mean latencies. Raises ``ScrapeError`` for
        every failure, parse errors and an engine unknown to the metric map included (as its cause).
        """
        text = await self.fetch_text(url)
        return self.parse_signals(url, text, engine, previous, gpu=True, gpu_labels=gpu_labels)

    async def scrape_gpu(self, url: str, *, labels: Mapping[str, str] | None = None) -> GpuSignals:
        """GPU signals of a DCGM exporter at ``url``."""
        return self.parse_gpu(url, await self.fetch_text(url), labels)

    async def scrape_target(
        self, target: ScrapeTarget, previous: EndpointSignals | None = None
    ) -> EndpointSignals:
        """The target's signals, from its own /metrics and, when set, its GPU exporter."""
        separate = target.gpu_metrics_url is not None and target.gpu_metrics_url != target.metrics_url
        labels = dict(target.gpu_labels) or None
        text = await self.fetch_text(target.metrics_url)
        signals = self.parse_signals(target.metrics_url, text, target.engine, previous, not separate, labels)
        if separate:
            assert target.gpu_metrics_url is not None
            signals = signals.with_gpu(await self.scrape_gpu(target.gpu_metrics_url, labels=labels))
        return signals

    def parse_signals(
        self,
        url: str,
        text: str,
        engine: str,
        previous: EndpointSignals | None,
        gpu: bool,
        gpu_labels: Mapping[str, str] | None,
    ) -> EndpointSignals:
        """Parse an answer of ``url`` read now; parse and mapping errors become ``ScrapeError``."""
        try:
            return signals_from_text(
                text, engine, self.metric_map, self.clock(), previous=previous, gpu=gpu, gpu_labels=gpu_labels
            )
        except ScrapeError:
            raise
        except TelemetryError as exc:
            raise ScrapeError(url, str(exc)) from exc

    def parse_gpu(self, url: str, text: str, labels: Mapping[str, str] | None) -> GpuSignals:
        """Parse a GPU exporter's answer of ``url``; parse errors become ``ScrapeError``."""
        try:
            return gpu_signals_from_text(text, self.metric_map, labels=labels)
        except TelemetryError as exc:
            raise ScrapeError(url, str(exc)) from exc


@dataclass(frozen=True, slots=True)
class ScrapeFailure:
    """The latest failed scrape of an endpoint."""

    endpoint_id: str
    url: str
    message: str
    at: float
    """Monotonic time of the failure."""
    consecutive: int
    """Failed rounds in a row."""


UpdateCallback = Callable[[dict[str, EndpointSignals]], Awaitable[None] | None]


class TelemetryCollector:
    """Scrapes every target every ``interval_s`` (± ``jitter`` of it), at most ``max_concurrency`` at once.

    ``targets`` is called at the start of every round, so the target list follows registry changes; the
    signals and failures of endpoints that left it are dropped. After each round ``on_update`` (sync or
    async) gets a copy of ``latest()``.

    A failed scrape keeps the endpoint's previous signals (they age, and consumers treat stale signals as
    missing) and sets ``last_error``; the next successful full scrape clears it.
    """

    def __init__(
        self,
        scraper: TelemetryScraper,
        targets: Callable[[], Iterable[ScrapeTarget]],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        jitter: float = 0.1,
        max_concurrency: int = 32,
        on_update: UpdateCallback | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be within [0, 1)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.scraper = scraper
        self.interval_s = interval_s
        self.jitter = jitter
        self.max_concurrency = max_concurrency
        self._targets = targets
        self._on_update = on_update
        self._rng = rng or random.Random()
        self._latest: dict[str, EndpointSignals] = {}
        self._errors: dict[str, ScrapeFailure] = {}
        self._background = BackgroundTask("telemetry-collector", self.run)
        self.rounds = 0
        """Rounds completed."""

    # ------------------------------------------------------------------ reading
    def latest(self) -> dict[str, EndpointSignals]:
        """The last good signals of every current target that was scraped successfully at least once."""
        return dict(self._latest)

    def last_error(self, endpoint_id: str) -> ScrapeFailure | None:
        """The failure of the endpoint's latest scrape, or ``None`` if it succeeded (or never ran)."""
        return self._errors.get(endpoint_id)

    def errors(self) -> dict[str, ScrapeFailure]:
        return dict(self._errors)

    # ------------------------------------------------------------------ running
    async def run_once(self) -> dict[str, EndpointSignals]:
        """One round over the current targets; returns ``latest()``."""
        try:
            targets = {t.endpoint_id: t for t in self._targets()}
        except Exception:
            log.exception("telemetry: the target list could not be built; round skipped")
            return self.latest()
        for gone in set(self._latest) - set(targets):
            del self._latest[gone]
        for gone in set(self._errors) - set(targets):
            del self._errors[gone]

        semaphore = asyncio.Semaphore(self.max_concurrency)
        gpu_fetches: dict[str, asyncio.Task[str]] = {}

        async def bounded_fetch(url: str) -> str:
            async with semaphore:
                return await self.scraper.fetch_text(url)

        def gpu_text(url: str) -> asyncio.Task[str]:
            # A DCGM exporter shared by several endpoints of a host is fetched once per round.
            if url not in gpu_fetches:
                gpu_fetches[url] = asyncio.ensure_future(bounded_fetch(url))
            return gpu_fetches[url]

        async def one(target: ScrapeTarget) -> None:
            endpoint_id = target.endpoint_id
            separate = target.gpu_metrics_url is not None and target.gpu_metrics_url != target.metrics_url
            labels = dict(target.gpu_labels) or None
            try:
                text = await bounded_fetch(target.metrics_url)
                signals = self.scraper.parse_signals(
                    target.metrics_url,
                    text,
                    target.engine,
                    self._latest.get(endpoint_id),
                    not separate,
                    labels,
                )
            except TelemetryError as exc:
                self._failed(endpoint_id, target.metrics_url, exc)
                return
            failure: tuple[str, TelemetryError] | None = None
            if target.gpu_metrics_url is not None and separate:
                try:
                    gpu = self.scraper.parse_gpu(
                        target.gpu_metrics_url, await gpu_text(target.gpu_metrics_url), labels
                    )
                    signals = signals.with_gpu(gpu)
                except TelemetryError as exc:
                    failure = (target.gpu_metrics_url, exc)
            self._latest[endpoint_id] = signals
            if failure is not None:
                self._failed(endpoint_id, *failure)
            else:
                self._succeeded(endpoint_id)

        results = await asyncio.gather(*(one(t) for t in targets.values()), return_exceptions=True)
        # GPU fetches are all awaited by their targets; gather them too so no exception goes unretrieved.
        await asyncio.gather(*gpu_fetches.values(), return_exceptions=True)
        for target, result in zip(targets.values(), results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("telemetry: scrape of %s crashed", target.endpoint_id, exc_info=result)
                reason = f"unexpected {type(result).__name__}: {result}"
                self._failed(target.endpoint_id, target.metrics_url, ScrapeError(target.metrics_url, reason))
        self.rounds += 1
        latest = self.latest()
        await self._notify(latest)
        return latest

    async def _notify(self, latest: dict[str, EndpointSignals]) -> None:
        if self._on_update is None:
            return
        try:
            result = self._on_update(latest)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("telemetry: on_update callback failed")

    def _failed(self, endpoint_id: str, url: str, exc: TelemetryError) -> None:
        before = self._errors.get(endpoint_id)
        consecutive = before.consecutive + 1 if before is not None else 1
        if before is None:
            log.warning("telemetry: %s: %s", endpoint_id, exc)
        else:
            log.debug("telemetry: %s: %s (%d in a row)", endpoint_id, exc, consecutive)
        self._errors[endpoint_id] = ScrapeFailure(
            endpoint_id=endpoint_id,
            url=url,
            message=str(exc),
            at=self.scraper.clock(),
            consecutive=consecutive,
        )

    def _succeeded(self, endpoint_id: str) -> None:
        if self._errors.pop(endpoint_id, None) is not None:
            log.info("telemetry: %s: scraping again", endpoint_id)

    def next_delay(self) -> float:
        """The pause before the next round: ``interval_s`` spread by ± ``jitter``."""
        return self.interval_s * (1.0 + self._rng.uniform(-self.jitter, self.jitter))

    async def run(self) -> None:
        """Scrape round after round until cancelled. A round's duration counts toward the interval."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.run_once()
            await asyncio.sleep(max(0.0, self.next_delay() - (loop.time() - started)))

    def start(self) -> asyncio.Task[None]:
        return self._background.start()

    async def stop(self) -> None:
        await self._background.stop()
