"""Keys to Envoy: the active keys (tenancy/service.py) and the usage accounting's refusals become the key
table of Envoy's API-key check (state.KeyEntry → builders/keys.py, pushed over ECDS by the control plane).

A refusal (`deny`) is how limits counted outside Envoy take effect inside it: when a key has used its tokens
per minute or its budget, the accounting denies it until a time, and the key check answers 429 with that
code until then, on every Envoy, without a listener update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from control_plane.state import KeyEntry
from control_plane.tenancy.keys import ApiKey
from control_plane.xds.sync import SyncReport

log = logging.getLogger(__name__)

Push = Callable[[tuple[KeyEntry, ...]], Awaitable[SyncReport | None]]


@dataclass(frozen=True)
class Denial:
    code: str  # "rate_limit_exceeded" (tokens per minute) or "insufficient_quota" (budget)
    until: int  # epoch seconds


def key_entry(key: ApiKey, denial: Denial | None = None) -> KeyEntry:
    settings = key.settings
    return KeyEntry(
        sha256=key.sha256,
        id=key.id,
        name=settings.name,
        models=tuple(settings.models) if settings.models is not None else None,
        priority=settings.priority,
        expires_at=int(settings.expires_at.timestamp()) if settings.expires_at else 0,
        rpm_limit=settings.rpm_limit or 0,
        tpm_limit=settings.tpm_limit or 0,
        denied=denial.code if denial else "",
        denied_until=denial.until if denial else 0,
    )


class KeyPublisher:
    """Holds the last key table and the current refusals; pushes their combination on every change."""

    def __init__(self, push: Push, clock: Callable[[], float] = time.time) -> None:
        self._push = push
        self._clock = clock
        self._keys: dict[str, ApiKey] = {}  # by id, in the table's order
        self._denials: dict[str, Denial] = {}

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return tuple(self._keys.values())

    def by_id(self, key_id: str) -> ApiKey | None:
        """A key's settings, looked up for every keyed request of a limited key: a dict, not a scan."""
        return self._keys.get(key_id)

    async def keys_changed(self, table: Sequence[ApiKey]) -> None:
        """A KeyService listener: the keys Envoy must accept now (pushed and waited for)."""
        self._keys = {k.id: k for k in table}
        await self._publish()

    async def deny(self, key_id: str, code: str, until: float) -> SyncReport | None:
        current = self._denials.get(key_id)
        denial = Denial(code, int(until) + 1)  # whole seconds, rounded up: never lifted early
        if current == denial:
            return None
        self._denials[key_id] = denial
        log.info("key %s refused (%s) until %d", key_id, code, denial.until)
        return await self._publish()

    async def lift(self, key_id: str) -> SyncReport | None:
        if self._denials.pop(key_id, None) is None:
            return None
        return await self._publish()

    def denials(self) -> dict[str, Denial]:
        now = self._clock()
        return {k: d for k, d in self._denials.items() if d.until > now}

    async def _publish(self) -> SyncReport | None:
        now = self._clock()
        self._denials = {k: d for k, d in self._denials.items() if d.until > now}
        entries = tuple(key_entry(k, self._denials.get(k.id)) for k in self._keys.values())
        return await self._push(entries)
