"""Runtime knob changes of a simulated engine (``POST /sim/control``): validated as a whole before any is
applied, so a bad request changes nothing. Pure: the current profile and latency in, the new ones out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .config import PROFILES, LatencySettings, profile_settings


def validated_changes(
    profile: str, latency: LatencySettings, changes: Mapping[str, Any]
) -> tuple[str, LatencySettings, dict[str, Any]]:
    """(profile, latency settings, other knob values) after ``changes``; ``ValueError`` naming the key on
    bad input. Accepted keys: see ``Engine.apply_control``."""
    updates: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "profile":
            if not isinstance(value, str) or value not in PROFILES:
                raise ValueError(f"profile must be one of {', '.join(PROFILES)}")
            profile = value
            latency = profile_settings(value)
        elif key in ("hang", "healthy"):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be a boolean")
            updates[key] = value
        elif key == "slowdown":
            updates[key] = _number(key, value, minimum=0.0, exclusive=True)
        elif key == "error_rate":
            rate = _number(key, value, minimum=0.0)
            if rate > 1.0:
                raise ValueError("error_rate must be within [0, 1]")
            updates[key] = rate
        elif key == "max_queue":
            updates[key] = _integer(key, value, minimum=0)
        elif key not in ("prefill_base_ms", "prefill_per_token_ms", "decode_ms_per_token", "max_batch"):
            raise ValueError(f"unknown control key {key!r}")
    if "prefill_base_ms" in changes:
        latency = replace(
            latency, prefill_base_ms=_number("prefill_base_ms", changes["prefill_base_ms"], minimum=0)
        )
    if "prefill_per_token_ms" in changes:
        value = _number("prefill_per_token_ms", changes["prefill_per_token_ms"], minimum=0)
        latency = replace(latency, prefill_per_token_ms=value)
    if "decode_ms_per_token" in changes:
        value = _number("decode_ms_per_token", changes["decode_ms_per_token"], minimum=0)
        latency = replace(latency, decode_ms_per_token=value)
    if "max_batch" in changes:
        latency = replace(latency, max_batch=_integer("max_batch", changes["max_batch"], minimum=1))
    latency.validate()
    return profile, latency, updates


def _number(key: str, value: object, *, minimum: float, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    number = float(value)
    if number != number or number < minimum or (exclusive and number == minimum):
        raise ValueError(f"{key} must be {'>' if exclusive else '>='} {minimum}")
    return number


def _integer(key: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer")
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}")
    return value
