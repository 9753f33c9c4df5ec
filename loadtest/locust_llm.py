"""The parts of the locust load test that do not need locust: settings, seeded distributions, prompts,
the SSE stream meter and OpenAI error messages.

Kept apart from ``locustfile.py`` so they can be imported (and type-checked) without starting locust.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CHAT_PATH = "/v1/chat/completions"
SCENARIOS = ("mixed", "seeds")

# --------------------------------------------------------------------------- distributions


@dataclass(frozen=True, slots=True)
class IntDistribution:
    """A seeded distribution of positive integers, written as a short spec:

    ``128`` or ``fixed:128``; ``uniform:LO:HI`` (inclusive); ``normal:MEAN:SD[:MIN:MAX]``;
    ``lognormal:MEDIAN:SIGMA[:MIN:MAX]``. Samples are rounded and clamped to ``[MIN, MAX]`` (default
    ``[1, 1_000_000]``).
    """

    spec: str
    kind: str
    a: float
    b: float
    low: int = 1
    high: int = 1_000_000

    @classmethod
    def parse(cls, spec: str) -> IntDistribution:
        text = spec.strip()
        parts = text.split(":")
        kind = parts[0].lower() if len(parts) > 1 else "fixed"
        raw = parts[1:] if len(parts) > 1 else parts
        try:
            numbers = [float(p) for p in raw]
        except ValueError:
            raise ValueError(f"bad distribution {spec!r}: numbers expected after the kind") from None
        if kind == "fixed" and len(numbers) == 1:
            value = int(numbers[0])
            if value < 1:
                raise ValueError(f"bad distribution {spec!r}: the value must be >= 1")
            return cls(text, kind, value, value, value, value)
        if kind == "uniform" and len(numbers) == 2:
            low, high = int(numbers[0]), int(numbers[1])
            if not 1 <= low <= high:
                raise ValueError(f"bad distribution {spec!r}: need 1 <= LO <= HI")
            return cls(text, kind, low, high, low, high)
        if kind in ("normal", "lognormal") and len(numbers) in (2, 4):
            a, b = numbers[0], numbers[1]
            if a <= 0 or b < 0:
                raise ValueError(f"bad distribution {spec!r}: the centre must be > 0 and the spread >= 0")
            low, high = (int(numbers[2]), int(numbers[3])) if len(numbers) == 4 else (1, 1_000_000)
            if not 1 <= low <= high:
                raise ValueError(f"bad distribution {spec!r}: need 1 <= MIN <= MAX")
            return cls(text, kind, a, b, low, high)
        raise ValueError(
            f"bad distribution {spec!r}: use N, fixed:N, uniform:LO:HI, normal:MEAN:SD[:MIN:MAX] "
            "or lognormal:MEDIAN:SIGMA[:MIN:MAX]"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "normal":
            value = rng.gauss(self.a, self.b)
        else:  # lognormal: a = median, b = sigma of the underlying normal
            value = rng.lognormvariate(math.log(self.a), self.b)
        return max(self.low, min(self.high, round(value)))


@dataclass(frozen=True, slots=True)
class ModelMix:
    """Weighted choice of models, written ``qwen2=1,llama3=1`` (a bare name weighs 1)."""

    models: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> ModelMix:
        models: list[str] = []
        weights: list[float] = []
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            name, _, weight = item.partition("=")
            name = name.strip()
            try:
                value = float(weight) if weight.strip() else 1.0
            except ValueError:
                raise ValueError(f"bad model mix {spec!r}: weight of {name!r} is not a number") from None
            if not name or value < 0 or not math.isfinite(value):
                raise ValueError(f"bad model mix {spec!r}: need NAME=WEIGHT with a weight >= 0")
            if name in models:
                raise ValueError(f"bad model mix {spec!r}: {name!r} appears twice")
            if value > 0:
                models.append(name)
                weights.append(value)
        if not models:
            raise ValueError(f"bad model mix {spec!r}: no model with a positive weight")
        return cls(tuple(models), tuple(weights))

    def pick(self, rng: random.Random) -> str:
        if len(self.models) == 1:
            return self.models[0]
        return rng.choices(self.models, weights=self.weights)[0]

    def __str__(self) -> str:
        return ",".join(f"{m}={w:g}" for m, w in zip(self.models, self.weights, strict=True))


@dataclass(frozen=True, slots=True)
class WaitPolicy:
    """Time between a user's requests: ``none`` (closed loop), ``constant:S``, ``between:A:B`` or
    ``pacing:S`` (one request every S seconds per user, whatever it took: an open-ish offered load of
    users / S requests per second as long as a request takes less than S)."""

    spec: str
    kind: str
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> WaitPolicy:
        text = spec.strip()
        parts = text.split(":")
        kind = parts[0].lower()
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"bad wait {spec!r}: numbers expected after the kind") from None
        if any(n < 0 or not math.isfinite(n) for n in numbers):
            raise ValueError(f"bad wait {spec!r}: times must be finite and >= 0")
        if kind == "none" and not numbers:
            return cls(text, kind)
        if kind in ("constant", "pacing") and len(numbers) == 1:
            return cls(text, kind, numbers[0], numbers[0])
        if kind == "between" and len(numbers) == 2 and numbers[0] <= numbers[1]:
            return cls(text, kind, numbers[0], numbers[1])
        raise ValueError(f"bad wait {spec!r}: use none, constant:S, between:A:B or pacing:S")

    def seconds(self, rng: random.Random, elapsed_s: float) -> float:
        """The wait after a request that took ``elapsed_s``."""
        if self.kind == "constant":
            return self.a
        if self.kind == "between":
            return rng.uniform(self.a, self.b)
        if self.kind == "pacing":
            return max(0.0, self.a - elapsed_s)
        return 0.0


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """Everything a chat user needs; built once from locust's parsed options."""

    scenario: str = "mixed"
    models: ModelMix = field(default_factory=lambda: ModelMix.parse("qwen2=1,llama3=1"))
    prompt_tokens: IntDistribution = field(default_factory=lambda: IntDistribution.parse("uniform:32:512"))
    max_tokens: IntDistribution = field(default_factory=lambda: IntDistribution.parse("uniform:16:128"))
    stream_ratio: float = 0.5
    wait: WaitPolicy = field(default_factory=lambda: WaitPolicy.parse("none"))
    seed: int = 0
    temperature: float = 0.7
    api_key: str = ""

    def describe(self) -> str:
        return (
            f"scenario={self.scenario} model-mix={self.models} prompt-tokens={self.prompt_tokens.spec} "
            f"max-tokens={self.max_tokens.spec} stream-ratio={self.stream_ratio:g} wait={self.wait.spec} "
            f"seed={self.seed}"
        )


SCENARIO_PRESETS: Mapping[str, Mapping[str, str]] = {
    # A mixed chat workload: varied prompt and answer lengths, half the requests streamed, closed loop.
    "mixed": {
        "model_mix": "qwen2=1,llama3=1",
        "prompt_tokens": "lognormal:200:0.8:16:2048",
        "max_tokens": "uniform:16:256",
        "stream_ratio": "0.5",
        "wait": "none",
    },
    # The seeds' claim: two models, 128 new tokens, 50 users; each user sends one request every 5 s,
    # so 50 users offer 10 requests/s (the middle of the seeds' 8-12 QPS) while the gateway keeps up.
    "seeds": {
        "model_mix": "qwen2=1,llama3=1",
        "prompt_tokens": "lognormal:200:0.8:16:2048",
        "max_tokens": "fixed:128",
        "stream_ratio": "0.5",
        "wait": "pacing:5",
    },
}
SEEDS_USERS = 50
SEEDS_P99_MS = 1500.0
SEEDS_QPS = (8.0, 12.0)
SEEDS_MAX_TOKENS = 128


def resolve_settings(options: Any) -> LoadSettings:
    """Settings from locust's parsed options: explicit flags (or their LOCUST_* variables) win over the
    scenario's preset. Raises ``ValueError`` with a readable message for a bad value."""

    def opt(name: str) -> Any:
        return getattr(options, name, None) if options is not None else None

    scenario = (opt("scenario") or "mixed").strip().lower()
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    preset = SCENARIO_PRESETS[scenario]

    def value(name: str) -> str:
        given = opt(name)
        return str(given) if given not in (None, "") else preset[name]

    try:
        stream_ratio = float(value("stream_ratio"))
    except ValueError:
        raise ValueError(f"bad stream ratio {value('stream_ratio')!r}: a number in [0, 1]") from None
    if not 0.0 <= stream_ratio <= 1.0:
        raise ValueError(f"bad stream ratio {stream_ratio}: a number in [0, 1]")
    seed = opt("seed")
    temperature = opt("temperature")
    return LoadSettings(
        scenario=scenario,
        models=ModelMix.parse(value("model_mix")),
        prompt_tokens=IntDistribution.parse(value("prompt_tokens")),
        max_tokens=IntDistribution.parse(value("max_tokens")),
        stream_ratio=stream_ratio,
        wait=WaitPolicy.parse(value("wait")),
        seed=int(seed) if seed not in (None, "") else 0,
        temperature=float(temperature) if temperature not in (None, "") else 0.7,
        api_key=str(opt("api_key") or ""),
    )


# --------------------------------------------------------------------------- prompts

CHARS_PER_TOKEN = 4
"""About four characters of English text per token (BPE tokenizers; the simulator counts exactly this)."""

_CORPUS_TEXT = (
    "the gateway routes each request by model to a replica that has room while the control plane "
    "watches health queue depth and cache use of every engine so that a slow or failing server "
    "leaves rotation before users notice and comes back once it answers again quickly the operator "
    "drains a node before maintenance and adds another model without restarting anything at all"
)
_WORDS = tuple(_CORPUS_TEXT.split())

_TEMPLATES = (
    # The seeds' three scenarios (qa, summarize, rewrite).
    "Answer the question using the notes below.\nNotes: {text}\nQuestion: what does the gateway do?",
    "Summarize the following text in three sentences.\n{text}",
    "Rewrite the following text in a formal tone.\n{text}",
)


class PromptFactory:
    """Prompts of about N tokens (at least one of the seeds' templates, 12 to 25 tokens): a slice at a
    random offset of a seeded corpus of words, in one of the templates. Random offsets keep engines'
    prefix caches from serving repeated prompts."""

    def __init__(self, seed: int, corpus_chars: int = 1 << 16) -> None:
        rng = random.Random(f"corpus:{seed}")
        words: list[str] = []
        size = 0
        while size < corpus_chars:
            word = rng.choice(_WORDS)
            words.append(word)
            size += len(word) + 1
        self.corpus = " ".join(words)

    def make(self, rng: random.Random, tokens: int) -> str:
        template = rng.choice(_TEMPLATES)
        chars = max(1, tokens * CHARS_PER_TOKEN - len(template) + len("{text}"))
        chars = min(chars, len(self.corpus))
        start = rng.randrange(0, len(self.corpus) - chars + 1)
        return template.format(text=self.corpus[start : start + chars])


def chat_body(
    model: str, prompt: str, max_tokens: int, stream: bool, temperature: float, seed: int | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if seed is not None:
        body["seed"] = seed
    return body


# --------------------------------------------------------------------------- errors


def error_message(status: int, body: bytes | str | None, fallback: str = "") -> str:
    """A short failure message from an error answer: OpenAI ``{"error": {"message", "code"}}``, TGI
    ``{"error": "...", "error_type": "..."}`` or FastAPI ``{"detail": ...}``; else the body's start."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    prefix = f"HTTP {status}" if status else "no response"
    detail = _error_detail(text)
    if detail:
        return f"{prefix} {detail}"[:300]
    snippet = " ".join(text.split())[:200] or fallback
    return f"{prefix}: {snippet}" if snippet else prefix


def _error_detail(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    return event_error(doc)


def event_error(doc: Mapping[str, Any]) -> str:
    """The error carried by a JSON object (an error answer or an SSE error event); '' for none."""
    error = doc.get("error")
    if isinstance(error, Mapping):
        code = error.get("code") or error.get("type") or ""
        message = error.get("message") or json.dumps(error)
        return f"{code}: {message}" if code else str(message)
    if isinstance(error, str) and error:
        kind = doc.get("error_type") or ""
        return f"{kind}: {error}" if kind else error
    detail = doc.get("detail")
    if detail:
        return str(detail)
    return ""


# --------------------------------------------------------------------------- streams


@dataclass(slots=True)
class StreamMeter:
    """Reads an OpenAI SSE chat stream line by line and times it.

    TTFT is taken at the first chunk with non-empty ``delta.content`` (the role-only chunk does not
    count); ITL is the gap between consecutive content chunks; the output tokens come from the usage
    chunk (``stream_options.include_usage``) or, without one, from the number of content chunks.
    Times are ``time.perf_counter()`` seconds.
    """

    started: float
    first_content_at: float | None = None
    last_content_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    content_chunks: int = 0
    usage_tokens: int | None = None
    done: bool = False
    error: str = ""
    bytes_read: int = 0

    def feed(self, line: bytes, now: float) -> None:
        self.bytes_read += len(line)
        if not line.startswith(b"data:"):
            return  # blank separators, comments (": keep-alive"), event:/id: fields
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        if not data:
            return
        try:
            event = json.loads(data)
        except ValueError:
            self.error = self.error or f"bad SSE data: {data[:80].decode('utf-8', 'replace')}"
            return
        if not isinstance(event, dict):
            return
        problem = event_error(event)
        if problem:
            self.error = self.error or f"stream error: {problem}"[:300]
            return
        usage = event.get("usage")
        if isinstance(usage, Mapping) and isinstance(usage.get("completion_tokens"), int):
            self.usage_tokens = usage["completion_tokens"]
        if _has_content(event):
            if self.last_content_at is None:
                self.first_content_at = now
            else:
                self.gaps.append(now - self.last_content_at)
            self.last_content_at = now
            self.content_chunks += 1

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.content_chunks

    @property
    def ttft(self) -> float | None:
        return None if self.first_content_at is None else self.first_content_at - self.started

    def problem(self) -> str:
        """Why the stream counts as failed; '' when it is a complete answer."""
        if self.error:
            return self.error
        if not self.done:
            return "stream ended without [DONE]" if self.content_chunks else "stream ended without content"
        if not self.content_chunks:
            return "stream without content"
        return ""


def _has_content(event: Mapping[str, Any]) -> bool:
    choices = event.get("choices")
    if not isinstance(choices, Sequence) or not choices:
        return False
    first = choices[0]
    if not isinstance(first, Mapping):
        return False
    delta = first.get("delta")
    content = delta.get("content") if isinstance(delta, Mapping) else first.get("text")
    return isinstance(content, str) and content != ""


def completion_tokens(doc: Mapping[str, Any]) -> tuple[int, str]:
    """Output tokens and a problem ('' when fine) of a non-streamed chat completion."""
    choices = doc.get("choices")
    if not isinstance(choices, Sequence) or not choices or not isinstance(choices[0], Mapping):
        return 0, "answer without choices"
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, Mapping) else None
    usage = doc.get("usage")
    if isinstance(usage, Mapping) and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"]), ""
    if isinstance(content, str):
        return max(1, round(len(content) / CHARS_PER_TOKEN)) if content else 0, ""
    return 0, "answer without content"
