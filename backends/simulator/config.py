"""Configuration of one simulated model server: engine kind, identity, latency knobs.

Everything here is immutable; the mutable runtime knobs live on the engine (see ``engine.Knobs``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from types import MappingProxyType


class EngineKind(enum.StrEnum):
    """The real model server whose HTTP API and metric names the simulator speaks."""

    TGI = "tgi"
    VLLM = "vllm"
    SGLANG = "sglang"
    TEI = "tei"

    @property
    def generates(self) -> bool:
        """True for text-generation servers, False for the embeddings server (TEI)."""
        return self is not EngineKind.TEI


@dataclass(frozen=True, slots=True)
class LatencySettings:
    """The latency model's parameters (see ``engine.Engine`` for how they are used)."""

    prefill_base_ms: float
    prefill_per_token_ms: float
    decode_ms_per_token: float
    max_batch: int

    def validate(self) -> None:
        for name in ("prefill_base_ms", "prefill_per_token_ms", "decode_ms_per_token"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")


_DEFAULT = LatencySettings(
    prefill_base_ms=20.0, prefill_per_token_ms=0.05, decode_ms_per_token=15.0, max_batch=16
)

PROFILES: MappingProxyType[str, LatencySettings] = MappingProxyType(
    {
        "instant": LatencySettings(0.0, 0.0, 0.0, 256),
        "fast": LatencySettings(2.0, 0.01, 2.0, 32),
        "default": _DEFAULT,
        "slow": replace(
            _DEFAULT,
            prefill_base_ms=_DEFAULT.prefill_base_ms * 3,
            prefill_per_token_ms=_DEFAULT.prefill_per_token_ms * 3,
            decode_ms_per_token=_DEFAULT.decode_ms_per_token * 3,
        ),
    }
)
"""Named latency presets; explicit command-line flags override individual fields."""


def profile_settings(name: str) -> LatencySettings:
    """The latency settings of a named profile; ``ValueError`` for an unknown name."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None


@dataclass(frozen=True, slots=True)
class GpuSettings:
    """The fake GPU whose DCGM telemetry the simulator exports."""

    total_mib: int = 24 * 1024
    weights_mib: int = 8 * 1024
    kv_pool_fraction: float = 0.9
    """Fraction of the card the engine may use at most (weights + KV cache), like vLLM's
    ``--gpu-memory-utilization``."""
    model_name: str = "NVIDIA A10G"
    reserved_mib: int = 0
    """A fixed footprint (``--memory-mb``): memory used stays at this, as a real engine reserves its weights
    and KV-cache pool when it loads; 0 = weights plus the used share of the KV pool."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything that defines one simulated server."""

    engine: EngineKind
    model_id: str
    endpoint_id: str
    served_names: tuple[str, ...] = ()
    profile: str = "default"
    latency: LatencySettings = _DEFAULT
    max_queue: int = 1024
    default_max_tokens: int = 32
    error_rate: float = 0.0
    slowdown: float = 1.0
    seed: int = 0
    max_model_len: int = 32768
    """Context window in tokens (prompt + completion)."""
    kv_cache_tokens: int = 65536
    """Fake KV-cache capacity in tokens; cache usage = tokens of running requests / this."""
    prefix_cache_tokens: int = 65536
    """Capacity of the replica's prefix cache in tokens (``prefix_cache.PrefixCache``); 0 turns it off.
    Real engines cache prefixes in the KV pool's free blocks, on by default (vLLM v1, SGLang)."""
    embedding_dim: int = 384
    gpu: GpuSettings = field(default_factory=GpuSettings)
    load_time_s: float = 0.0
    """Seconds after start during which the server answers 503 ``model loading`` (a real engine loading its
    weights), ``/health`` included."""

    def __post_init__(self) -> None:
        self.latency.validate()
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if not self.endpoint_id:
            raise ValueError("endpoint_id must not be empty")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")
        if self.slowdown <= 0:
            raise ValueError("slowdown must be > 0")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.kv_cache_tokens < 1:
            raise ValueError("kv_cache_tokens must be >= 1")
        if self.prefix_cache_tokens < 0:
            raise ValueError("prefix_cache_tokens must be >= 0")
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be >= 1")
        if self.load_time_s < 0:
            raise ValueError("load_time_s must be >= 0")
        if self.gpu.reserved_mib < 0:
            raise ValueError("memory_mb must be >= 0")

    @property
    def accepted_model_names(self) -> tuple[str, ...]:
        """Names accepted in a request's ``model`` field: the model id first, then served names."""
        names = [self.model_id]
        names.extend(n for n in self.served_names if n not in names)
        return tuple(names)


def make_config(
    engine: EngineKind | str,
    model_id: str,
    endpoint_id: str,
    *,
    profile: str = "default",
    prefill_base_ms: float | None = None,
    prefill_per_token_ms: float | None = None,
    decode_ms_per_token: float | None = None,
    max_batch: int | None = None,
    **kwargs: object,
) -> SimConfig:
    """Build a ``SimConfig`` from a profile plus explicit overrides (``None`` = profile value)."""
    base = profile_settings(profile)
    latency = LatencySettings(
        prefill_base_ms=base.prefill_base_ms if prefill_base_ms is None else prefill_base_ms,
        prefill_per_token_ms=base.prefill_per_token_ms
        if prefill_per_token_ms is None
        else prefill_per_token_ms,
        decode_ms_per_token=base.decode_ms_per_token if decode_ms_per_token is None else decode_ms_per_token,
        max_batch=base.max_batch if max_batch is None else max_batch,
    )
    return SimConfig(
        engine=EngineKind(engine),
        model_id=model_id,
        endpoint_id=endpoint_id,
        profile=profile,
        latency=latency,
        **kwargs,  # type: ignore[arg-type]
    )
