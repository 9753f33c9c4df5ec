"""A per-replica prefix cache of prompt blocks, like vLLM's automatic prefix caching or SGLang's radix cache.

A prompt is cut into blocks of ``BLOCK_TOKENS`` tokens (16, vLLM's default block size; with the simulator's
tokenizer, 4 characters a token, that is 64 characters of the prompt's text). Each block's hash covers
the block *and every block before it* (the hash of the whole prefix so far), so a block can only hit when
all blocks before it hit too, as in vLLM, where a KV block is only valid after the same prefix. Only full
blocks are cached; the partial tail of a prompt is always computed.

The cache keeps at most ``capacity_tokens // BLOCK_TOKENS`` blocks and evicts the least recently used.
Blocks of one prompt are touched from the last to the first, so the first blocks of a prompt (shared by
more requests: the system prompt, the first turns) are the most recent and the tail goes first, like
vLLM, which frees a finished request's blocks tail first.

Counters are in tokens, as vLLM's ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` are.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from .tokens import CHARS_PER_TOKEN

BLOCK_TOKENS = 16
BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN


def block_hashes(text: str) -> tuple[bytes, ...]:
    """The chained hashes of the full blocks of a prompt's text (the i-th covers blocks 0..i)."""
    data = text.encode("utf-8", errors="surrogatepass")
    full = len(data) // BLOCK_CHARS
    running = hashlib.blake2b(digest_size=16)
    out = []
    for index in range(full):
        running.update(data[index * BLOCK_CHARS : (index + 1) * BLOCK_CHARS])
        out.append(running.copy().digest())
    return tuple(out)


def prompt_blocks(capacity_tokens: int, text: str) -> tuple[bytes, ...]:
    """The prompt's block hashes when the replica has a prefix cache (none to compute otherwise)."""
    return block_hashes(text) if capacity_tokens // BLOCK_TOKENS > 0 else ()


class PrefixCache:
    """An LRU set of block hashes with hit accounting. ``capacity_tokens == 0`` turns it off."""

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens < 0:
            raise ValueError("capacity_tokens must be >= 0")
        self.capacity_blocks = capacity_tokens // BLOCK_TOKENS
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        self.queries = 0
        """Prompt tokens looked up (every prompt token of every request, as vLLM counts them)."""
        self.hits = 0
        """Prompt tokens found in the cache."""

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    @property
    def used_tokens(self) -> int:
        return len(self._blocks) * BLOCK_TOKENS

    @property
    def hit_rate(self) -> float:
        """Hits over queries since start (0 before any query), SGLang's ``cache_hit_rate``."""
        return self.hits / self.queries if self.queries else 0.0

    def lookup(self, blocks: Sequence[bytes], prompt_tokens: int) -> int:
        """Cached tokens of a prompt: its leading blocks found in the cache (touched), counted.

        At least one token is always computed (the engine needs the last position's logits), as vLLM
        does when a whole prompt hits.
        """
        if not self.enabled:
            return 0
        found = 0
        for block in blocks:
            if block not in self._blocks:
                break
            found += 1
        self._touch(blocks[:found])
        cached = min(found * BLOCK_TOKENS, max(0, prompt_tokens - 1))
        self.queries += prompt_tokens
        self.hits += cached
        return cached

    def insert(self, blocks: Sequence[bytes]) -> None:
        """Add (or refresh) a computed prompt's blocks, evicting the least recently used beyond capacity."""
        if not self.enabled:
            return
        # A prompt longer than the cache keeps its first blocks: a tail without its prefix never hits.
        self._touch(blocks[: self.capacity_blocks])
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def _touch(self, blocks: Sequence[bytes]) -> None:
        # Last block first: the prompt's first blocks end up most recent, its tail is evicted first.
        for block in reversed(blocks):
            self._blocks[block] = None
            self._blocks.move_to_end(block)

    def clear(self) -> None:
        self._blocks.clear()
