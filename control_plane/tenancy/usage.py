"""Usage per API key and model, from Envoy's access-log stream (an `EntrySink` of xds/als.py).

With API keys on, every request that passed the key check reaches the control plane's access-log stream
with its key (tenancy/usage_entry.py reads it). `UsageAccounting.record` counts it three ways:
- Prometheus: `llm_gateway_key_requests_total{key, model, code}` and
  `llm_gateway_key_tokens_total{key, model, kind}` (kind prompt|completion). `key` is the key's name,
  `model` the registry's model id ((unknown) / (none) as for local replies), `code` `ok`, the gateway's
  error code or `upstream_error`. Keys are made by operators, not clients, so the label is bounded by
  them; beyond `max_key_labels` distinct names in one process, further keys are labelled `(other)`
  (their usage is still complete in the usage API);
- per key, model and minute (UTC, by the request's start) in memory, added to the store (`UsageStore`,
  SQLite) by `flush()`: every `flush_interval_s` and at shutdown. Queries read the store and what is
  not flushed yet, so they never miss a count; a crash loses at most the last interval;
- the token limits (usage_limits.py): tokens per minute and budgets, refused through the key table.

Everything here runs on the event loop (the gRPC server's): record, flush and queries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.config.schema import Registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.tenancy.keys import ApiKey
from control_plane.tenancy.publish import KeyPublisher
from control_plane.tenancy.usage_entry import KeyedRequest, keyed_request
from control_plane.tenancy.usage_limits import Clock, DenialWorker, TokenLimits, month_start, seed_since
from control_plane.tenancy.usage_store import Counts, Grouping, UsageRow, UsageStore, group_of
from control_plane.xds.log_entries import ModelNames

log = logging.getLogger(__name__)

OTHER_KEY = "(other)"
FALLBACK_CODE = "gateway_error"
_MAX_CODE_LENGTH = 64
_PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class UsageSettings:
    retention_days: int = 35  # minute rows older than this are deleted
    max_key_labels: int = 1000  # distinct key names in the Prometheus labels; then `(other)`
    flush_interval_s: float = 5.0


def _code_label(code: str) -> str:
    # The codes are the gateway's own, but bound what becomes a label all the same.
    if not code or len(code) > _MAX_CODE_LENGTH or not code.replace("_", "").isalnum():
        return FALLBACK_CODE
    return code


class UsageAccounting:
    def __init__(
        self,
        store: UsageStore,
        metrics: ControlPlaneMetrics,
        registry: Registry,
        publisher: KeyPublisher,
        settings: UsageSettings = UsageSettings(),
        clock: Clock = time.time,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._names = ModelNames(registry)
        self._labelled: set[str] = set()
        self._limited: frozenset[str] = frozenset()  # ids of the keys with a tpm_limit or a budget
        self._pending: dict[tuple[str, str, int], Counts] = {}
        # Budgets count from the store's tokens of this month, the tokens per minute from its last two
        # minute rows (a restart keeps both; refused again by `keys_changed` at start), then from entries.
        now = clock()
        self.limits = TokenLimits(
            store.daily_tokens(month_start(now)), clock=clock, recent=store.key_tokens(seed_since(now))
        )
        self.denials = DenialWorker(self.limits, publisher, clock=clock)
        self._flusher: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self.follow_registry(registry)

    # Following the registry and the keys
    def follow_registry(self, registry: Registry) -> None:
        self._names.follow_registry(registry)

    async def follow(self, registry: Registry) -> None:
        """A registry listener (ControlPlane.add_registry_listener)."""
        self.follow_registry(registry)

    async def keys_changed(self, table: tuple[ApiKey, ...]) -> None:
        """A KeyService listener (after the publisher's): a limit raised, lowered, set or removed, a key
        revoked, or the keys loaded at start (budgets and tokens per minute used up before a restart are
        refused again)."""
        self._limited = frozenset(k.id for k in table if _limited(k))
        self.denials.check({*self.limits.known(), *self._limited})

    # The sink
    def record(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> KeyedRequest | None:
        request = keyed_request(entry)
        if request is None:
            return None
        now = self._clock()
        model = self.model_id(request.model)
        key = self._key_label(request.key_name)
        self._metrics.key_requests.labels(key, model, _code_label(request.code)).inc()
        if request.prompt_tokens:
            self._metrics.key_tokens.labels(key, model, "prompt").inc(request.prompt_tokens)
        if request.completion_tokens:
            self._metrics.key_tokens.labels(key, model, "completion").inc(request.completion_tokens)
        # By the request's start (a stream's tokens belong to its minute); an absurd time: now.
        started = request.start_time if 0 < request.start_time <= now + 60 else now
        minute = int(started) - int(started) % 60
        counts = self._pending.setdefault((request.key_id, model, minute), Counts())
        counts.add(
            Counts(
                requests=1,
                prompt_tokens=request.prompt_tokens,
                completion_tokens=request.completion_tokens,
                errors=int(request.status >= 400 and request.status != 429),
                rate_limited=int(request.status == 429),
                estimated=int(request.estimated),
            )
        )
        tokens = request.prompt_tokens + request.completion_tokens
        if tokens:
            self.limits.add(request.key_id, tokens, started)
            if request.key_id in self._limited:
                self.denials.check((request.key_id,))
        return request

    def model_id(self, name: str) -> str:
        return self._names.of(name)

    def _key_label(self, name: str) -> str:
        if name in self._labelled:
            return name
        if len(self._labelled) >= self._settings.max_key_labels:
            return OTHER_KEY
        self._labelled.add(name)
        return name

    # Queries (the store plus what is not flushed yet)
    def summary(self, key_id: str | None, since: int, until: int, by: Grouping) -> dict[str | int, Counts]:
        out = self._store.summary(key_id, since, until, by)
        for (row_key, model, minute), counts in self._pending.items():
            if (key_id is None or row_key == key_id) and since <= minute < until:
                group = group_of(UsageRow(row_key, model, minute, counts), by)
                out.setdefault(group, Counts()).add(counts)
        return out

    # Persistence
    def flush(self) -> int:
        """Add the counts not yet stored to the store (one transaction); the number of rows."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        try:
            self._store.add(UsageRow(k, m, minute, c) for (k, m, minute), c in pending.items())
        except Exception:
            # Kept for the next flush (added to what came since), not lost.
            for group, counts in pending.items():
                self._pending.setdefault(group, Counts()).add(counts)
            raise
        return len(pending)

    def prune(self) -> int:
        before = int(self._clock()) - self._settings.retention_days * 86400
        return self._store.prune(before - before % 60)

    def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="usage-flush")

    def stop(self) -> None:
        """Stop the flusher and store what is left (shutdown: the caller closes the store after)."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.denials.stop()
        self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.flush_interval_s)
            try:
                self.flush()
                if self._clock() - self._last_prune >= _PRUNE_EVERY_S:
                    self._last_prune = self._clock()
                    pruned = self.prune()
                    if pruned:
                        log.info("usage: %d minute rows past the retention deleted", pruned)
            except Exception:  # the database busy or full: try again next time, keep counting
                log.exception("storing usage failed; kept in memory for the next flush")


def _limited(key: ApiKey) -> bool:
    return key.settings.tpm_limit is not None or key.settings.budget_tokens is not None
