"""When a model counts as saturated: its replicas' telemetry against thresholds, with hysteresis.

Pure (the clock is passed in). Per model, over its replicas with fresh signals: the mean queue depth per
replica (requests waiting for a batch slot) and the mean KV-cache use. Levels:

- 0: serving normally;
- 1 (saturated): a signal reached its `saturated` threshold: low-priority requests are shed;
- 2 (severe): a signal reached its `severe` threshold: default-priority requests are shed too.

A level is entered as soon as a scrape shows it. It is left only once every signal is under its
threshold times `clear_ratio` and the level has been held `hold_s`, so a queue hovering at a threshold does
not make Envoy's table flap; a level is lowered one step at a time. A model without fresh signals is
level 0: shedding fails open (no telemetry is no evidence of overload).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from control_plane.config.overload import OverloadSettings, Thresholds
from control_plane.telemetry.signals import EndpointSignals

SATURATED, SEVERE = 1, 2


@dataclass(frozen=True)
class ModelLoad:
    replicas: int  # replicas with fresh signals
    queue_per_replica: float | None
    kv_cache: float | None


def model_load(signals: Iterable[EndpointSignals], now: float, max_age_s: float) -> ModelLoad:
    fresh = [s for s in signals if s.is_fresh(now, max_age_s)]
    queues = [s.queue_depth for s in fresh if s.queue_depth is not None]
    kv = [s.kv_cache_usage for s in fresh if s.kv_cache_usage is not None]
    return ModelLoad(
        replicas=len(fresh),
        queue_per_replica=sum(queues) / len(queues) if queues else None,
        kv_cache=sum(kv) / len(kv) if kv else None,
    )


def reaches(load: ModelLoad, thresholds: Thresholds, ratio: float = 1.0) -> bool:
    """Whether any signal is at or over its threshold (times `ratio`)."""
    pairs = (
        (load.queue_per_replica, thresholds.queue_per_replica),
        (load.kv_cache, thresholds.kv_cache),
    )
    return any(value is not None and limit is not None and value >= limit * ratio for value, limit in pairs)


def target_level(load: ModelLoad, saturated: Thresholds, severe: Thresholds) -> int:
    if load.replicas == 0:
        return 0
    if reaches(load, severe):
        return SEVERE
    return SATURATED if reaches(load, saturated) else 0


@dataclass
class _Held:
    level: int
    since: float  # when this level was entered


class SaturationTracker:
    """Per-model levels across telemetry rounds (the hysteresis needs the previous level)."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._loads: dict[str, ModelLoad] = {}

    def levels(self) -> dict[str, int]:
        return {model: held.level for model, held in self._held.items() if held.level}

    def loads(self) -> Mapping[str, ModelLoad]:
        return dict(self._loads)

    def update(
        self,
        groups: Mapping[str, Sequence[str]],
        signals: Mapping[str, EndpointSignals],
        thresholds: Mapping[str, tuple[Thresholds, Thresholds]],
        settings: OverloadSettings,
        now: float,
        max_age_s: float,
    ) -> dict[str, int]:
        """One round: `groups` model id → its endpoint ids, `thresholds` model id → (saturated, severe).
        Returns the levels of every model above 0."""
        for gone in set(self._held) - set(groups):
            del self._held[gone]
            self._loads.pop(gone, None)
        for model, endpoint_ids in groups.items():
            load = model_load((signals[e] for e in endpoint_ids if e in signals), now, max_age_s)
            self._loads[model] = load
            saturated, severe = thresholds.get(model, (settings.saturated, settings.severe))
            self._step(model, load, saturated, severe, settings, now)
        return self.levels()

    def _step(
        self,
        model: str,
        load: ModelLoad,
        saturated: Thresholds,
        severe: Thresholds,
        settings: OverloadSettings,
        now: float,
    ) -> None:
        held = self._held.get(model) or _Held(0, now)
        wanted = target_level(load, saturated, severe)
        if wanted > held.level:
            self._held[model] = _Held(wanted, now)
            return
        if held.level == 0 or now - held.since < settings.hold_s:
            self._held[model] = held
            return
        # Lower one step once the signals are clearly under the current level's thresholds.
        current = severe if held.level == SEVERE else saturated
        if load.replicas == 0 or not reaches(load, current, settings.clear_ratio):
            self._held[model] = _Held(held.level - 1, now)
        else:
            self._held[model] = held


def model_thresholds(
    overrides: Mapping[str, tuple[Thresholds | None, Thresholds | None]], settings: OverloadSettings
) -> dict[str, tuple[Thresholds, Thresholds]]:
    """Model id → (saturated, severe): its own where it sets them, else the registry's."""
    return {
        model: (saturated or settings.saturated, severe or settings.severe)
        for model, (saturated, severe) in overrides.items()
    }
