"""The registry's overload settings: priority classes, when a model counts as saturated, fallback models.

Registry-wide `overload:` (schema.Registry) with per-model threshold overrides (`models[i].overload`) and
per-model `fallbacks`, checked here (known models, not itself, no cycle) with errors naming their path.
See docs/balancing.md, "Priority and shedding" and "Fallback models".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from control_plane.config.base import Frozen
from control_plane.config.names import HEADER_NAME

if TYPE_CHECKING:  # schema imports this module: no import cycle at run time
    from control_plane.config.schema import ModelConfig

PRIORITIES = ("high", "default", "low")


class Thresholds(Frozen):
    """A level is reached when any signal set here is at or over its value (null: not used)."""

    queue_per_replica: float | None = Field(
        default=None, ge=0, le=1_000_000, description="Requests waiting in the engines, per replica."
    )
    kv_cache: float | None = Field(default=None, ge=0, le=1, description="Mean KV-cache use, 0..1.")

    @model_validator(mode="after")
    def _one_signal(self) -> Thresholds:
        if self.queue_per_replica is None and self.kv_cache is None:
            raise ValueError("set queue_per_replica, kv_cache or both")
        return self


class ModelOverload(Frozen):
    """A model's own thresholds, over the registry's, and its reserve for high priority."""

    saturated: Thresholds | None = None
    severe: Thresholds | None = None
    reserve_for_high: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Requests in flight kept for high priority: the other classes may have at most "
        "limits.max_concurrent_requests minus this (Envoy's per-priority circuit breakers); 0: none.",
    )


class OverloadSettings(Frozen):
    """Priority classes and load shedding (the control plane decides saturation from telemetry)."""

    enabled: bool = Field(
        default=True,
        description="Decide saturation from telemetry: shed low (then default) priority, switch to "
        "fallbacks.",
    )
    priority_header: bool = Field(
        default=False,
        description="Accept a client's priority header. Without API keys it sets the class; with keys it "
        "may only lower the key's class, never raise it.",
    )
    header: str = Field(default="x-gateway-priority", description="The priority header's (lower-case) name.")
    saturated: Thresholds = Field(
        default=Thresholds(queue_per_replica=8, kv_cache=0.95),
        description="Level 1: low-priority requests are shed.",
    )
    severe: Thresholds = Field(
        default=Thresholds(queue_per_replica=32),
        description="Level 2: default-priority requests are shed too (high never is).",
    )
    clear_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Hysteresis: a level is left once every signal is under its threshold times this.",
    )
    hold_s: float = Field(
        default=5.0, ge=0, le=3600, description="A level is held at least this long before it is lowered."
    )
    retry_after_s: int = Field(default=2, ge=1, le=3600, description="`retry-after` of a shed request.")

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        if not HEADER_NAME.fullmatch(value):
            raise ValueError("must be a lower-case header name: letters a-z, digits and '-'")
        return value


def fallback_problems(models: Sequence[ModelConfig]) -> list[str]:
    """Every fallback that names no model (by id or alias), the model itself or closes a cycle, and a
    reserve for high priority that leaves nothing to the others, as `models[i]....: …` lines."""
    ids = {name: model.id for model in models for name in model.names}
    position = {model.id: index for index, model in enumerate(models)}
    problems: list[str] = []
    graph: dict[str, list[tuple[str, int]]] = {}  # model id → (fallback id, its index in the list)
    for index, model in enumerate(models):
        targets: list[tuple[str, int]] = []
        for f_index, name in enumerate(model.fallbacks):
            where = f"models[{index}].fallbacks[{f_index}]"
            target = ids.get(name)
            if target is None:
                problems.append(f"{where}: no model is named {name!r}")
            elif target == model.id:
                problems.append(f"{where}: a model cannot fall back to itself ({name!r})")
            elif target in (t for t, _ in targets):
                problems.append(f"{where}: {name!r} is listed twice")
            else:
                targets.append((target, f_index))
        graph[model.id] = targets
    problems.extend(_cycles(graph, position))
    for index, model in enumerate(models):
        reserve = model.overload.reserve_for_high if model.overload else 0
        if reserve and reserve >= model.limits.max_concurrent_requests:
            problems.append(
                f"models[{index}].overload.reserve_for_high: {reserve} leaves nothing of "
                f"limits.max_concurrent_requests ({model.limits.max_concurrent_requests}) to other priorities"
            )
    return problems


def _cycles(graph: dict[str, list[tuple[str, int]]], position: dict[str, int]) -> list[str]:
    """One line per cycle found by a depth-first walk, naming the fallback that closes it."""
    problems: list[str] = []
    done: set[str] = set()
    for start in graph:
        stack: list[tuple[str, int]] = [(start, 0)]
        on_path = [start]
        while stack:
            node, child = stack[-1]
            if node in done or child >= len(graph[node]):
                stack.pop()
                on_path.pop()
                done.add(node)
                continue
            stack[-1] = (node, child + 1)
            target, f_index = graph[node][child]
            if target in on_path:
                cycle = " → ".join([*on_path[on_path.index(target) :], target])
                problems.append(
                    f"models[{position[node]}].fallbacks[{f_index}]: fallbacks form a cycle ({cycle}); a "
                    "fallback chain must end"
                )
            elif target not in done:
                stack.append((target, 0))
                on_path.append(target)
    return problems
