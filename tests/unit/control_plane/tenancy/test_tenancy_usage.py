"""Usage accounting from access-log entries built as Envoy streams them: per key and model in
Prometheus (key by name, model by registry id, bounded labels), per minute in SQLite across a restart,
window queries that include what is not flushed yet, budgets refused again after a restart and the
tokens-per-minute window seeded from the last stored minutes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from control_plane.config import parse_registry
from control_plane.tenancy.usage import OTHER_KEY, UsageSettings
from control_plane.tenancy.usage_store import Counts, SqliteUsageStore, UsageRow
from control_plane.xds.log_entries import NO_MODEL, UNKNOWN_MODEL
from tests.support.usage_entries import KEY_A, KEY_B, REGISTRY, T0, Clock, Harness, api_key, keyed_entry

pytestmark = pytest.mark.unit


def test_counts_per_key_name_and_model_id_in_prometheus(tmp_path: Path) -> None:
    h = Harness(tmp_path / "gateway.db", Clock())
    record = h.usage.record
    assert record(keyed_entry(KEY_A, "team-a", "qwen", prompt=10, completion=5, start=T0)) is not None
    record(keyed_entry(KEY_A, "team-a", "qwen2", prompt=1, completion=2, start=T0))
    record(keyed_entry(KEY_A, "team-a", "llama3", 429, "rate_limit_exceeded", start=T0))
    record(keyed_entry(KEY_A, "team-a", "gpt-9", 404, "model_not_found", start=T0))
    record(keyed_entry(KEY_A, "team-a", None, 400, "invalid_request", start=T0))
    record(keyed_entry(KEY_B, "team-b", "qwen", 502, start=T0))  # an engine's error: upstream_error
    # A stream whose client asked for no usage: charged its max_tokens, flagged estimated.
    record(keyed_entry(KEY_B, "team-b", "llama3", prompt=None, max_tokens=64, start=T0))
    # No key (auth off, or refused before the key check): not counted here.
    assert record(keyed_entry(None, prompt=100, completion=100)) is None

    requests = "llm_gateway_key_requests_total"
    tokens = "llm_gateway_key_tokens_total"
    assert h.sample(requests, key="team-a", model="qwen2", code="ok") == 2
    assert h.sample(tokens, key="team-a", model="qwen2", kind="prompt") == 11
    assert h.sample(tokens, key="team-a", model="qwen2", kind="completion") == 7
    assert h.sample(requests, key="team-a", model="llama3", code="rate_limit_exceeded") == 1
    assert h.sample(requests, key="team-a", model=UNKNOWN_MODEL, code="model_not_found") == 1
    assert h.sample(requests, key="team-a", model=NO_MODEL, code="invalid_request") == 1
    assert h.sample(requests, key="team-b", model="qwen2", code="upstream_error") == 1
    assert h.sample(tokens, key="team-b", model="llama3", kind="completion") == 64
    text = generate_latest(h.metrics.registry).decode()
    assert "key_0000" not in text  # labelled by name, never by id

    by_model = h.usage.summary(KEY_A, int(T0) - 3600, int(T0) + 60, "model")
    assert by_model["qwen2"] == Counts(requests=2, prompt_tokens=11, completion_tokens=7)
    assert by_model["llama3"] == Counts(requests=1, rate_limited=1)
    assert by_model[UNKNOWN_MODEL].errors == 1 and by_model[NO_MODEL].errors == 1
    b = h.usage.summary(KEY_B, int(T0) - 3600, int(T0) + 60, "model")
    assert b["llama3"] == Counts(requests=1, completion_tokens=64, estimated=1)
    assert b["qwen2"].errors == 1


def test_key_labels_are_capped_and_models_follow_the_registry(tmp_path: Path) -> None:
    h = Harness(tmp_path / "gateway.db", Clock(), UsageSettings(max_key_labels=2))
    for i in range(5):
        h.usage.record(keyed_entry(f"key_{i:016x}", f"team-{i}", "qwen", prompt=1, start=T0))
    h.usage.record(keyed_entry("key_0000000000000000", "team-0", "qwen", prompt=1, start=T0))
    assert h.sample("llm_gateway_key_requests_total", key="team-0", model="qwen2", code="ok") == 2
    assert h.sample("llm_gateway_key_requests_total", key="team-1", model="qwen2", code="ok") == 1
    assert h.sample("llm_gateway_key_requests_total", key=OTHER_KEY, model="qwen2", code="ok") == 3
    # Beyond the cap, usage per key is still whole in the store.
    assert h.usage.summary("key_0000000000000004", 0, int(T0) + 60, "model")["qwen2"].requests == 1

    h.usage.record(keyed_entry(KEY_A, "team-a", "mistral", start=T0))
    assert h.usage.summary(KEY_A, 0, int(T0) + 60, "model").keys() == {UNKNOWN_MODEL}
    grown = parse_registry(
        {
            "models": [
                *(
                    {"id": m.id, "engine": m.engine, "endpoints": [{"url": "http://127.0.0.1:1"}]}
                    for m in REGISTRY.models
                ),
                {
                    "id": "mistral-7b",
                    "aliases": ["mistral"],
                    "engine": "vllm",
                    "endpoints": [{"url": "http://127.0.0.1:3"}],
                },
            ]
        }
    )
    asyncio.run(h.usage.follow(grown))
    h.usage.record(keyed_entry(KEY_A, "team-a", "mistral", start=T0))
    assert h.usage.summary(KEY_A, 0, int(T0) + 60, "model")["mistral-7b"].requests == 1


def test_minutes_survive_a_restart_and_windows_group_them(tmp_path: Path) -> None:
    db = tmp_path / "var" / "gateway.db"
    clock = Clock()
    h = Harness(db, clock)
    minute = int(T0) - int(T0) % 60
    # Three requests in this minute, one 61 s earlier (the minute before), one 2 h earlier.
    h.usage.record(keyed_entry(KEY_A, "team-a", "qwen", prompt=3, completion=4, start=T0))
    h.usage.record(keyed_entry(KEY_A, "team-a", "llama3", prompt=1, completion=1, start=T0 + 5))
    h.usage.record(keyed_entry(KEY_A, "team-a", "qwen", 429, "rate_limit_exceeded", start=T0 + 10))
    h.usage.record(keyed_entry(KEY_A, "team-a", "qwen", prompt=10, completion=10, start=T0 - 61))
    h.usage.record(keyed_entry(KEY_A, "team-a", "qwen", prompt=100, completion=100, start=T0 - 7200))
    assert h.usage.flush() == 4  # (key, model, minute) rows
    assert h.usage.flush() == 0
    # More after the flush, counted in queries before it is stored.
    h.usage.record(keyed_entry(KEY_A, "team-a", "qwen", prompt=1, completion=1, start=T0 + 20))
    seen = h.usage.summary(KEY_A, minute, minute + 60, "model")
    assert seen["qwen2"] == Counts(requests=3, prompt_tokens=4, completion_tokens=5, rate_limited=1)
    h.usage.stop()  # shutdown: what is pending is stored
    h.store.close()

    again = Harness(db, clock)  # a restarted control plane
    by_minute = again.usage.summary(KEY_A, minute - 60, minute + 60, "minute")
    assert by_minute == {
        minute - 60: Counts(requests=1, prompt_tokens=10, completion_tokens=10),
        minute: Counts(requests=4, prompt_tokens=5, completion_tokens=6, rate_limited=1),
    }
    hour = minute - minute % 3600
    by_hour = again.usage.summary(KEY_A, hour - 7200, hour + 3600, "hour")
    assert sorted(by_hour) == [hour - 7200, hour - 3600, hour]
    assert by_hour[hour - 7200].tokens == 200
    by_day = again.usage.summary(KEY_A, 0, minute + 60, "day")
    assert list(by_day) == [minute - minute % 86400] and by_day[minute - minute % 86400].requests == 6
    # A window excludes its end and other keys.
    assert again.usage.summary(KEY_A, minute - 60, minute, "model")["qwen2"].requests == 1
    assert again.usage.summary(KEY_B, 0, minute + 60, "model") == {}
    top = again.usage.summary(None, minute - 60, minute + 60, "key")
    assert top == {KEY_A: Counts(requests=5, prompt_tokens=15, completion_tokens=16, rate_limited=1)}

    # A flush repeated into rows already stored adds to them.
    again.usage.record(keyed_entry(KEY_A, "team-a", "qwen", prompt=2, start=T0))
    again.usage.flush()
    assert again.store.summary(KEY_A, minute, minute + 60, "model")["qwen2"].prompt_tokens == 6
    # Retention: rows older than it are deleted.
    clock.now = T0 + 35 * 86400 - 3600
    assert again.usage.prune() == 1  # only the row 2 h before T0 is past 35 days
    assert again.store.summary(KEY_A, 0, minute + 60, "hour").keys() == {hour - 3600, hour}
    again.store.close()


def test_a_failed_flush_keeps_the_counts(tmp_path: Path) -> None:
    h = Harness(tmp_path / "gateway.db", Clock())
    h.usage.record(keyed_entry(KEY_A, "team-a", "qwen", prompt=3, start=T0))
    real_add = h.store.add

    def broken(rows: object) -> None:
        raise OSError("disk full")

    h.store.add = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        h.usage.flush()
    h.usage.record(keyed_entry(KEY_A, "team-a", "qwen", prompt=4, start=T0))
    h.store.add = real_add  # type: ignore[method-assign]
    assert h.usage.flush() == 1
    assert h.store.summary(KEY_A, 0, int(T0) + 60, "model")["qwen2"] == Counts(requests=2, prompt_tokens=7)
    h.store.close()


def test_budgets_used_before_a_restart_are_refused_again(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    clock = Clock()
    store = SqliteUsageStore(db)
    day = int(T0) - int(T0) % 86400
    store.add(
        [
            UsageRow(KEY_A, "qwen2", day + 60, Counts(requests=1, prompt_tokens=600, completion_tokens=400)),
            UsageRow(KEY_B, "qwen2", day - 86400, Counts(requests=1, prompt_tokens=900)),  # yesterday
        ]
    )
    store.close()

    async def scenario() -> Harness:
        h = Harness(db, clock)
        keys = (
            api_key(KEY_A, "team-a", budget_tokens=1000, budget_period="day"),
            api_key(KEY_B, "team-b", budget_tokens=1000, budget_period="day"),
        )
        await h.publisher.keys_changed(keys)
        await h.usage.keys_changed(keys)  # as TenancyWiring.start does
        await h.usage.denials.idle()
        return h

    h = asyncio.run(scenario())
    denials = h.publisher.denials()
    assert denials.keys() == {KEY_A}  # team-b's tokens were yesterday's
    assert denials[KEY_A].code == "insufficient_quota" and denials[KEY_A].until == day + 86400 + 1
    assert {e.id: e.denied for e in h.tables[-1]} == {KEY_A: "insufficient_quota", KEY_B: ""}
    h.store.close()


def test_the_tokens_per_minute_window_is_seeded_from_the_last_two_minute_rows(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store = SqliteUsageStore(db)
    minute = int(T0) - int(T0) % 60  # T0 is 30 s into its minute
    store.add(
        [
            UsageRow(KEY_A, "qwen2", minute, Counts(requests=1, prompt_tokens=30, completion_tokens=10)),
            UsageRow(KEY_A, "llama3", minute, Counts(requests=1, prompt_tokens=5)),
            UsageRow(KEY_A, "qwen2", minute - 60, Counts(requests=1, completion_tokens=7)),  # overlaps 60 s
            UsageRow(KEY_A, "qwen2", minute - 120, Counts(requests=1, prompt_tokens=1000)),  # too old
            UsageRow(KEY_B, "qwen2", minute - 120, Counts(requests=1, prompt_tokens=1000)),
        ]
    )
    assert store.key_tokens(minute - 60) == {KEY_A: 52}
    store.close()
    clock = Clock(T0)
    h = Harness(db, clock)
    assert h.usage.limits.window_tokens(KEY_A) == 52 and h.usage.limits.window_tokens(KEY_B) == 0
    # All counted as used at the start: kept for a full 60 s from it, then gone.
    clock.now = T0 + 59.9
    assert h.usage.limits.window_tokens(KEY_A) == 52
    clock.now = T0 + 60
    assert h.usage.limits.window_tokens(KEY_A) == 0
    h.store.close()
