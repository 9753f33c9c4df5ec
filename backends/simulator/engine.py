"""The latency model and the continuous-batching scheduler.

At most ``max_batch`` requests run at once; more wait in a FIFO queue of at most ``max_queue``
(beyond it ``Overloaded`` is raised). An admitted request first pays its prefill,
``prefill_base_ms + prefill_per_token_ms * uncached prompt tokens``, which produces the first token (the
prompt's leading blocks found in the replica's prefix cache, ``prefix_cache.PrefixCache``, are not
computed again; the prompt's blocks are cached once its prefill is done); each further
token takes one decode step of ``decode_ms_per_token * (1 + 0.02 * (running - 1))``. Both are
multiplied by the live ``slowdown`` knob. Waiting is done with asyncio sleeps against deadlines, so
sleep overshoot does not accumulate.

Usage (the context manager always releases the batch slot, whatever happens to the caller)::

    async with engine.generation(job) as gen:   # may raise Overloaded / SimulatedFailure
        async for token in gen.tokens():
            ...
    gen.outcome  # timings and finish reason once all tokens were consumed
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

from .config import LatencySettings, SimConfig
from .knob_changes import validated_changes
from .prefix_cache import PrefixCache
from .stats import EngineStats
from .tokens import Token, generate_tokens

BATCH_STEP_PENALTY = 0.02
"""Each additional running request makes a decode step this much slower."""


class EngineError(Exception):
    """A request the engine refused; ``kind`` is the failure label used in metrics."""

    kind = "generation"


class Overloaded(EngineError):
    kind = "overloaded"


class SimulatedFailure(EngineError):
    kind = "generation"


@dataclass(frozen=True, slots=True)
class Job:
    """What the engine needs to know about one request."""

    prompt_tokens: int
    max_tokens: int = 0
    """Tokens to generate; 0 for prefill-only work (embeddings)."""
    limit_requested: bool = True
    """Whether the client set the limit. If not, reaching it is reported as a natural stop
    (``stop``, as if the model emitted EOS); otherwise as ``length``."""
    seed: int = 0
    """Seeds the generated text."""
    prefix_blocks: tuple[bytes, ...] = ()
    """The prompt's chained block hashes (``prefix_cache.block_hashes``); empty: nothing cacheable."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of a generation that ran to its end. Times are in seconds."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    prefill_time: float
    inference_time: float
    ttft: float
    e2e: float
    time_per_output_token: float


@dataclass(slots=True)
class Knobs:
    """Runtime-adjustable behaviour (see ``Engine.apply_control``)."""

    profile: str
    latency: LatencySettings
    slowdown: float
    error_rate: float
    max_queue: int
    hang: bool = False
    healthy: bool = True


class Generation:
    """One request's life in the engine: queued, running, then done or closed."""

    def __init__(self, engine: Engine, job: Job, submitted_at: float) -> None:
        self.engine = engine
        self.job = job
        self.submitted_at = submitted_at
        self.admitted_at: float | None = None
        self.generated = 0
        self.outcome: Outcome | None = None
        self._admitted = asyncio.Event()

    def _admit(self, now: float) -> None:
        self.admitted_at = now
        self._admitted.set()

    @property
    def context_tokens(self) -> int:
        """Tokens this request currently holds in the (fake) KV cache."""
        return self.job.prompt_tokens + self.generated

    async def tokens(self) -> AsyncIterator[Token]:
        """Wait for a batch slot, prefill, then yield the tokens at the model's pace.

        For prefill-only jobs (``max_tokens == 0``) this yields nothing and returns after the prefill.
        """
        engine = self.engine
        await self._admitted.wait()
        assert self.admitted_at is not None
        latency = engine.knobs.latency
        cached = (
            engine.prefix_cache.lookup(self.job.prefix_blocks, self.job.prompt_tokens)
            if engine.config.engine.generates
            else 0
        )
        prefill = (
            (latency.prefill_base_ms + latency.prefill_per_token_ms * (self.job.prompt_tokens - cached))
            * engine.knobs.slowdown
            / 1000.0
        )
        deadline = self.admitted_at + prefill
        await engine.sleep_until(deadline)
        prefilled_at = engine.now()
        engine.prefix_cache.insert(self.job.prefix_blocks)
        engine.stats.prompt_tokens += self.job.prompt_tokens
        first_token_at = prefilled_at
        texts = generate_tokens(self.job.seed)
        for index in range(self.job.max_tokens):
            if index:
                deadline = max(deadline + engine.decode_step_seconds(), engine.now() - 0.05)
                await engine.sleep_until(deadline)
            token = next(texts)
            self.generated += 1
            engine.stats.generation_tokens += 1
            if index == 0:
                first_token_at = engine.now()
            yield token
        done_at = engine.now()
        n = self.generated
        reason = "length" if n and n >= self.job.max_tokens and self.job.limit_requested else "stop"
        self.outcome = Outcome(
            finish_reason=reason,
            prompt_tokens=self.job.prompt_tokens,
            completion_tokens=n,
            queue_time=self.admitted_at - self.submitted_at,
            prefill_time=prefilled_at - self.admitted_at,
            inference_time=done_at - self.admitted_at,
            ttft=first_token_at - self.submitted_at,
            e2e=done_at - self.submitted_at,
            time_per_output_token=(done_at - first_token_at) / (n - 1) if n > 1 else 0.0,
        )

    async def run(self) -> list[Token]:
        """Run to the end and return all tokens (non-streaming use)."""
        return [token async for token in self.tokens()]


class Engine:
    """Scheduler, latency model, runtime knobs and statistics of one simulated server."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.knobs = Knobs(
            profile=config.profile,
            latency=config.latency,
            slowdown=config.slowdown,
            error_rate=config.error_rate,
            max_queue=config.max_queue,
        )
        self.stats = EngineStats()
        self.prefix_cache = PrefixCache(config.prefix_cache_tokens)
        self._rng = random.Random(config.seed)
        self._waiting: deque[Generation] = deque()
        self._running: set[Generation] = set()
        self._hang_released = asyncio.Event()
        self._hang_released.set()
        self.hung = 0
        """Requests currently held back by the ``hang`` knob."""
        self._tasks: set[asyncio.Task[Any]] = set()
        """Tasks currently inside ``generation()`` (cancelled by ``abort_all``)."""

    # ----------------------------------------------------------------- clock
    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self.now()
        await asyncio.sleep(delay if delay > 0 else 0)

    def decode_step_seconds(self) -> float:
        running = max(1, len(self._running))
        latency = self.knobs.latency
        return (
            latency.decode_ms_per_token
            * (1.0 + BATCH_STEP_PENALTY * (running - 1))
            * self.knobs.slowdown
            / 1000.0
        )

    # ------------------------------------------------------------- live gauges
    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def running_tokens(self) -> int:
        return sum(g.context_tokens for g in self._running)

    @property
    def batch_max_tokens(self) -> int:
        """Tokens the running batch may grow to (prompt + max new tokens of each request)."""
        return sum(g.job.prompt_tokens + g.job.max_tokens for g in self._running)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction (0..1) of the fake KV cache held by running requests."""
        return min(1.0, self.running_tokens / self.config.kv_cache_tokens)

    @property
    def batch_occupancy(self) -> float:
        """Fraction (0..1) of batch slots in use."""
        return min(1.0, self.running / self.knobs.latency.max_batch)

    # --------------------------------------------------------------- requests
    def record_rejected(self, kind: str = "validation") -> None:
        """Count a request the API layer refused before it reached the engine."""
        self.stats.requests += 1
        self.stats.failures[kind] += 1

    @asynccontextmanager
    async def generation(self, job: Job) -> AsyncIterator[Generation]:
        """Admit ``job`` (after any ``hang``); raise ``EngineError`` if it is refused.

        Leaving the block releases the batch slot or queue place; a generation that did not run to its
        end is counted as ``cancelled``.
        """
        self.stats.requests += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                await self._wait_while_hung()
            except asyncio.CancelledError:
                self.stats.failures["cancelled"] += 1
                raise
            if self.knobs.error_rate > 0 and self._rng.random() < self.knobs.error_rate:
                self.stats.failures[SimulatedFailure.kind] += 1
                raise SimulatedFailure("simulated failure (error_rate knob)")
            gen = self._submit(job)
            try:
                yield gen
            finally:
                self._release(gen)
                if gen.outcome is None:
                    self.stats.failures["cancelled"] += 1
                else:
                    self._record_success(gen.outcome, job)
        finally:
            if task is not None:
                self._tasks.discard(task)

    def abort_all(self) -> int:
        """Cancel every request in the engine (queued, running or hung); used at shutdown."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def _wait_while_hung(self) -> None:
        if not self.knobs.hang:
            return
        self.hung += 1
        try:
            while self.knobs.hang:
                await self._hang_released.wait()
        finally:
            self.hung -= 1

    def _submit(self, job: Job) -> Generation:
        gen = Generation(self, job, self.now())
        if not self._waiting and len(self._running) < self.knobs.latency.max_batch:
            self._running.add(gen)
            gen._admit(self.now())
        elif len(self._waiting) >= self.knobs.max_queue:
            self.stats.failures[Overloaded.kind] += 1
            raise Overloaded(f"request queue is full ({self.knobs.max_queue} waiting)")
        else:
            self._waiting.append(gen)
        return gen

    def _release(self, gen: Generation) -> None:
        if gen in self._running:
            self._running.discard(gen)
        else:
            with suppress(ValueError):
                self._waiting.remove(gen)
        self._fill()

    def _fill(self) -> None:
        while self._waiting and len(self._running) < self.knobs.latency.max_batch:
            gen = self._waiting.popleft()
            self._running.add(gen)
            gen._admit(self.now())

    def _record_success(self, outcome: Outcome, job: Job) -> None:
        stats = self.stats
        stats.successes += 1
        stats.finished[outcome.finish_reason] += 1
        stats.e2e.observe(outcome.e2e)
        stats.queue_time.observe(outcome.queue_time)
        stats.inference_time.observe(outcome.inference_time)
        stats.input_length.observe(outcome.prompt_tokens)
        if job.max_tokens:
            stats.ttft.observe(outcome.ttft)
            stats.generated_length.observe(outcome.completion_tokens)
            if outcome.completion_tokens > 1:
                stats.time_per_output_token.observe(outcome.time_per_output_token)

    # ---------------------------------------------------------------- control
    def apply_control(self, changes: Mapping[str, Any]) -> None:
        """Validate and apply runtime knob changes atomically; ``ValueError`` on bad input.

        Accepted keys: ``profile`` (replaces all latency settings, applied first), ``slowdown``,
        ``error_rate``, ``hang``, ``healthy``, ``prefill_base_ms``, ``prefill_per_token_ms``,
        ``decode_ms_per_token``, ``max_batch``, ``max_queue``. (``crash`` is handled by the HTTP layer.)
        """
        knobs = self.knobs
        profile, latency, updates = validated_changes(knobs.profile, knobs.latency, changes)
        knobs.profile = profile
        knobs.latency = latency
        for key, value in updates.items():
            setattr(knobs, key, value)
        if knobs.hang:
            self._hang_released.clear()
        else:
            self._hang_released.set()
        self._fill()

    def snapshot(self) -> dict[str, Any]:
        """Knobs and live counters, as served on ``/sim/state``."""
        knobs = self.knobs
        stats = self.stats
        return {
            "engine": str(self.config.engine),
            "model_id": self.config.model_id,
            "endpoint_id": self.config.endpoint_id,
            "served_names": list(self.config.accepted_model_names),
            "profile": knobs.profile,
            **asdict(knobs.latency),
            "slowdown": knobs.slowdown,
            "error_rate": knobs.error_rate,
            "max_queue": knobs.max_queue,
            "hang": knobs.hang,
            "healthy": knobs.healthy,
            "queue": self.queue_size,
            "running": self.running,
            "hung": self.hung,
            "kv_cache_usage": self.kv_cache_usage,
            "requests": stats.requests,
            "served": stats.successes,
            "failed": stats.failed,
            "failures": dict(stats.failures),
            "prompt_tokens": stats.prompt_tokens,
            "generation_tokens": stats.generation_tokens,
            "prefix_cache_tokens": self.prefix_cache.used_tokens,
            "prefix_cache_queries": self.prefix_cache.queries,
            "prefix_cache_hits": self.prefix_cache.hits,
        }
