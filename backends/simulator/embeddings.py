"""Deterministic fake embeddings and rerank scores (a pure function of the text and the seed)."""

from __future__ import annotations

import math
import random
import re

from .tokens import stable_seed

_WORD = re.compile(r"\w+")


def embed_text(text: str, dim: int, seed: int, *, normalize: bool = True) -> list[float]:
    """A pseudo-random vector determined by ``text``; unit length when ``normalize``."""
    rng = random.Random(stable_seed(seed, "embedding", text))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    if normalize:
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        vector = [x / norm for x in vector]
    return vector


def rerank_logit(query: str, text: str, seed: int) -> float:
    """A relevance logit: word overlap with the query plus a small deterministic jitter."""
    query_words = {w.lower() for w in _WORD.findall(query)}
    text_words = {w.lower() for w in _WORD.findall(text)}
    overlap = len(query_words & text_words) / len(query_words) if query_words else 0.0
    jitter = random.Random(stable_seed(seed, "rerank", query, text)).uniform(-0.5, 0.5)
    return 6.0 * overlap - 3.0 + jitter


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
