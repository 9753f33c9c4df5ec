"""The simulator's prefix cache: chained block hashes, LRU eviction, uncached-only prefill, and the
engines' real metric names for it (vLLM's counters in tokens, SGLang's hit-rate gauge)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.simulator.config import make_config
from backends.simulator.engine import Engine, Job
from backends.simulator.prefix_cache import BLOCK_CHARS, BLOCK_TOKENS, PrefixCache, block_hashes

pytestmark = pytest.mark.unit

SYSTEM = "You are a helpful assistant. " * 20  # about 150 tokens: nine full blocks


def test_block_hashes_are_chained_over_full_blocks():
    text = "a" * (3 * BLOCK_CHARS + 10)
    blocks = block_hashes(text)
    assert len(blocks) == 3  # the partial tail is never cached
    assert len(set(blocks)) == 3  # identical block texts, different prefixes: different hashes
    # A longer text with the same start shares the leading hashes (a later turn of a conversation).
    assert block_hashes(text + "b" * 200)[:3] == blocks
    # A different first block changes every hash after it: a block only hits with all before it.
    changed = block_hashes("b" + text[1:])
    assert not set(changed) & set(blocks)


def test_lookup_counts_leading_hits_and_keeps_one_token_to_compute():
    cache = PrefixCache(capacity_tokens=100 * BLOCK_TOKENS)
    blocks = block_hashes("x" * (4 * BLOCK_CHARS))
    assert cache.lookup(blocks, 4 * BLOCK_TOKENS) == 0
    cache.insert(blocks)
    # The same prompt again: all but the last token is cached (its logits are needed).
    assert cache.lookup(blocks, 4 * BLOCK_TOKENS) == 4 * BLOCK_TOKENS - 1
    longer = block_hashes("x" * (6 * BLOCK_CHARS))
    assert cache.lookup(longer, 6 * BLOCK_TOKENS + 5) == 4 * BLOCK_TOKENS
    assert cache.queries == 4 * BLOCK_TOKENS * 2 + 6 * BLOCK_TOKENS + 5
    assert cache.hits == 4 * BLOCK_TOKENS - 1 + 4 * BLOCK_TOKENS
    assert 0 < cache.hit_rate < 1


def test_lru_evicts_the_least_recent_prompt_tail_first():
    cache = PrefixCache(capacity_tokens=6 * BLOCK_TOKENS)
    first = block_hashes("a" * (4 * BLOCK_CHARS))
    second = block_hashes("b" * (4 * BLOCK_CHARS))
    cache.insert(first)
    cache.insert(second)  # 8 blocks into 6: two of `first` go, its tail first
    assert cache.used_tokens == 6 * BLOCK_TOKENS
    assert cache.lookup(first, 4 * BLOCK_TOKENS) == 2 * BLOCK_TOKENS  # its first two blocks survive
    assert cache.lookup(second, 4 * BLOCK_TOKENS) == 4 * BLOCK_TOKENS - 1


def test_a_prompt_longer_than_the_cache_keeps_its_first_blocks():
    cache = PrefixCache(capacity_tokens=2 * BLOCK_TOKENS)
    blocks = block_hashes("z" * (5 * BLOCK_CHARS))
    cache.insert(blocks)
    assert cache.lookup(blocks, 5 * BLOCK_TOKENS) == 2 * BLOCK_TOKENS


def test_capacity_zero_turns_the_cache_off():
    cache = PrefixCache(capacity_tokens=0)
    blocks = block_hashes("q" * (3 * BLOCK_CHARS))
    cache.insert(blocks)
    assert not cache.enabled and cache.lookup(blocks, 48) == 0 and cache.queries == 0
    with pytest.raises(ValueError):
        PrefixCache(capacity_tokens=-1)


def test_prefill_costs_only_the_uncached_tokens():
    """The engine's prefill deadline (recorded, not slept) follows the uncached prompt tokens."""

    async def main() -> list[float]:
        engine = Engine(
            make_config(
                "vllm", "m", "m-0", prefill_base_ms=10, prefill_per_token_ms=1.0, decode_ms_per_token=0
            )
        )
        prefills: list[float] = []

        async def record(deadline: float) -> None:
            prefills.append(deadline)

        engine.sleep_until = record  # type: ignore[method-assign]
        blocks = block_hashes("p" * (10 * BLOCK_CHARS))
        for _ in range(2):
            job = Job(prompt_tokens=10 * BLOCK_TOKENS, max_tokens=1, prefix_blocks=blocks)
            async with engine.generation(job) as gen:
                await gen.run()
                assert gen.admitted_at is not None
                prefills[-1] -= gen.admitted_at
        return prefills

    cold, warm = asyncio.run(main())
    assert cold == pytest.approx((10 + 160) / 1000, abs=1e-6)
    assert warm == pytest.approx((10 + 1) / 1000, abs=1e-6)  # one token computed


def _samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _turns() -> list[list[dict[str, str]]]:
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Tell me about rivers. " * 8},
    ]
    first = list(history)
    history += [{"role": "assistant", "content": "Rivers flow to the sea. " * 6}]
    history += [{"role": "user", "content": "And lakes? " * 5}]
    return [first, history]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_later_turn_hits_the_earlier_turns_prefix_in_the_real_metric_names(sim, engine):
    async def main() -> tuple[str, dict[str, Any]]:
        async with sim(engine) as s, httpx.AsyncClient(base_url=s.url) as c:
            for messages in _turns():
                body = {"model": "qwen2", "messages": messages, "max_tokens": 2}
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
            state = (await c.get("/sim/state")).json()
            return (await c.get("/metrics")).text, state

    text, state = asyncio.run(main())
    samples = _samples(text)
    assert state["prefix_cache_hits"] > 0 and state["prefix_cache_tokens"] > 0
    rate = state["prefix_cache_hits"] / state["prefix_cache_queries"]
    if engine == "vllm":
        (hits,) = samples["vllm:prefix_cache_hits_total"]
        (queries,) = samples["vllm:prefix_cache_queries_total"]
        assert hits.labels == {"model_name": "qwen2"}
        # The whole first turn is a prefix of the second one (every full block of it hits).
        first_turn_blocks = len(block_hashes("system: " + SYSTEM + "\nuser: " + "Tell me about rivers. " * 8))
        assert hits.value == state["prefix_cache_hits"] >= first_turn_blocks * BLOCK_TOKENS
        assert queries.value == state["prefix_cache_queries"] == state["prompt_tokens"]
    else:
        (gauge,) = samples["sglang:cache_hit_rate"]
        assert gauge.value == pytest.approx(rate)


def test_cache_off_from_the_command_line():
    from backends.simulator.cli import build_parser, config_from_args

    args = build_parser().parse_args(["--engine", "vllm", "--model-id", "m", "--prefix-cache-tokens", "0"])
    assert config_from_args(args).prefix_cache_tokens == 0
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        make_config("vllm", "m", "m-0", prefix_cache_tokens=-5)
