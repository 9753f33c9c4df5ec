"""A fake, deterministic tokenizer and text generator.

Counting: about four characters per token (like BPE tokenizers on English text). Chat prompts add a
small per-message overhead, as chat templates do. Generation: each token is one short pseudo word
with a leading space, drawn from a seeded RNG, so the same request gives the same text.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens a chat template adds per message (role markers, separators)."""
ASSISTANT_PRIMING_TOKENS = 3
"""Tokens a chat template adds to start the assistant's turn."""
TOKEN_ID_OFFSET = 1000

_WORDS = """
    the of and to in is it that for on was with as at by an be this from or had not are but
    have they one you all we were her she there his which their said if will up do each about
    how out them then many some so these would other into has more two like him see time could
    no make than first been its who now people my made over did down only way find use may water
    long little very after words called just where most know get through back much before go good
    new write our used me man too any day same right look think also around another came come
    work three word must because does part even place well such here take why things help put
    years different away again off went old number great tell men say small every found still
    between name should home big give air line set own under read last never us left end along
    while might next sound below saw something thought both few those always looked show large
    often together asked house world going want school important until form food keep children
    feet land side without boy once animals life enough took sometimes four head above kind
    began almost live page got earth need far hand high year mother light parts country father
"""
VOCAB: tuple[str, ...] = tuple(_WORDS.split())
"""The pseudo words generated text is made of (token id = ``TOKEN_ID_OFFSET`` + index)."""


def count_text_tokens(text: str) -> int:
    """Tokens in a piece of text: ceil(characters / 4); at least 1 for non-empty text."""
    if not text:
        return 0
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def message_text(content: object) -> str:
    """The text of a chat message's ``content``: a string, a list of parts, or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    return str(content)


def count_chat_tokens(messages: Iterable[Mapping[str, object]]) -> int:
    """Prompt tokens of a chat request: content tokens plus template overhead."""
    total = ASSISTANT_PRIMING_TOKENS
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS + count_text_tokens(message_text(message.get("content")))
    return total


def chat_prompt_text(messages: Iterable[Mapping[str, object]]) -> str:
    """A flat rendering of a chat conversation (used to seed the generated text)."""
    return "\n".join(f"{m.get('role', '')}: {message_text(m.get('content'))}" for m in messages)


def stable_seed(*parts: object) -> int:
    """A process-independent 64-bit seed from arbitrary parts (``hash()`` is salted per process)."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token."""

    id: int
    text: str
    logprob: float


def generate_tokens(seed: int) -> Iterator[Token]:
    """An endless deterministic stream of pseudo-word tokens for ``seed``."""
    rng = random.Random(seed)
    while True:
        index = rng.randrange(len(VOCAB))
        yield Token(
            id=TOKEN_ID_OFFSET + index, text=" " + VOCAB[index], logprob=round(-rng.random() * 2.0, 4)
        )
