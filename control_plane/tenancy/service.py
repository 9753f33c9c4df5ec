"""Key management: keys made through the admin API (stored) and keys declared in the registry file,
under one set of names, with every change audited and announced to the listeners that push the key
table to the Envoys.

Rules:
- a name belongs to one key among the stored keys not revoked and the keys the file declares (409);
- declared keys (`reg_<name>`, source `registry`) change only in the file: the API refuses to change,
  rotate or revoke them (409). A declared key whose name (or hash) a stored key has already is skipped
  while that stored key lives, with a warning (`warnings`): the key handed out first keeps working;
- a listener's failure never undoes a stored change. The change stays, the failure is logged and the
  call raises KeyPushError (the admin API answers 503 with the key, and the clear key if the call made
  one); the next change, or the same call again, pushes the whole table again. A registry reload only
  logs it: the reload itself went through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

from control_plane.config.schema import Registry
from control_plane.tenancy.errors import KeyConflict, KeyInvalid, KeyNotFound, KeyPushError
from control_plane.tenancy.keys import (
    REGISTRY_ID_PREFIX,
    ApiKey,
    KeyPatch,
    KeySettings,
    check_key_id,
    declared_key,
    key_hash,
    new_key_id,
    new_secret,
    secret_prefix,
)
from control_plane.tenancy.store import KeyStore

log = logging.getLogger(__name__)

# Called with the keys Envoy must accept now (active_keys), after every change.
KeyListener = Callable[[tuple[ApiKey, ...]], Awaitable[None]]
# (action, target, detail), e.g. the admin store's audit: `lambda a, t, d: store.write([], a, t, d)`.
AuditLog = Callable[[str, str, str], None]
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def _no_audit(action: str, target: str, detail: str) -> None:
    return None


class KeyService:
    def __init__(self, store: KeyStore, *, audit: AuditLog | None = None, clock: Clock = utc_now) -> None:
        self._store = store
        self._audit = audit or _no_audit
        self._clock = clock
        self._declared: dict[str, ApiKey] = {}  # by name: every key the file declares
        self._model_names: frozenset[str] | None = None  # None until a registry is followed
        self._mode = "none"
        self._listeners: list[KeyListener] = []
        self._followed = False  # whether follow() ran once (and announced the table)
        # One change at a time, its listeners included: they see the changes in the order made.
        self._changes = asyncio.Lock()

    @property
    def mode(self) -> str:
        """The registry's `auth.mode`: `none` (no key checked) or `api_key`."""
        return self._mode

    def now(self) -> datetime:
        """The service's clock (whether a key has expired is judged against it)."""
        return self._clock()

    def add_listener(self, listener: KeyListener) -> None:
        self._listeners.append(listener)

    # Reading
    def get(self, key_id: str) -> ApiKey:
        check_key_id(key_id)
        if key_id.startswith(REGISTRY_ID_PREFIX):
            for key in self._declared_in_effect():
                if key.id == key_id:
                    return key
        elif (stored := self._store.get(key_id)) is not None:
            return stored
        raise KeyNotFound(f"no key {key_id!r}")

    def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        return [*self._declared_in_effect(), *self._store.list_keys(include_revoked)]

    def active_keys(self, now: datetime | None = None) -> tuple[ApiKey, ...]:
        """The keys Envoy must accept at `now` (default: the clock's now): not revoked, not expired."""
        at = now or self._clock()
        return tuple(k for k in self.list_keys() if k.is_active(at))

    def next_expiry(self, now: datetime | None = None) -> datetime | None:
        """When the next active key expires: the key table must be pushed again then."""
        at = now or self._clock()
        expiries = [k.settings.expires_at for k in self.active_keys(at) if k.settings.expires_at]
        return min(expiries, default=None)

    @property
    def warnings(self) -> list[str]:
        return [
            f"registry key {k.name!r} skipped: a key made through the admin API has its {what}"
            for k, what in self._skipped_declared()
        ]

    # Changes
    async def create(self, settings: KeySettings) -> tuple[ApiKey, str]:
        """A new stored key and its clear key (the only time it exists outside the caller)."""
        async with self._changes:
            now = self._clock()
            self._check_future(settings.expires_at, now)
            self._check_models(settings.models)
            self._check_name_free(settings.name)
            secret = new_secret()
            key = ApiKey(new_key_id(), settings, key_hash(secret), secret_prefix(secret), now, now)
            self._store.create(key)
            self._audit("key.create", key.id, f"{_settings_detail(settings)} prefix={key.prefix}")
            await self._announce(key, "created", secret)
            return key, secret

    async def update(self, key_id: str, patch: KeyPatch) -> ApiKey:
        """Change the fields `patch` was given (null clears one); the rest stays."""
        async with self._changes:
            current = self._changeable(key_id)
            now = self._clock()
            settings = patch.apply(current.settings)
            if "expires_at" in patch.model_fields_set:
                self._check_future(settings.expires_at, now)
            if "models" in patch.model_fields_set:
                self._check_models(settings.models)
            if settings.name != current.name:
                self._check_name_free(settings.name)
            key = self._store.update_settings(key_id, settings, now)
            self._audit("key.update", key_id, patch.model_dump_json(exclude_unset=True))
            await self._announce(key, "updated")
            return key

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (kept, with `revoked_at`, for its usage history). Revoking it again answers the
        same record and pushes the key table again."""
        async with self._changes:
            current = self._changeable(key_id, allow_revoked=True)
            key = self._store.revoke(key_id, self._clock())
            if current.revoked_at is None:
                self._audit("key.revoke", key_id, f"name={key.name}")
            await self._announce(key, "revoked")
            return key

    async def rotate(self, key_id: str) -> tuple[ApiKey, str]:
        """A new clear key for the same key (same id, settings and usage); the old one stops at once."""
        async with self._changes:
            self._changeable(key_id)
            secret = new_secret()
            key = self._store.set_hash(key_id, key_hash(secret), secret_prefix(secret), self._clock())
            self._audit("key.rotate", key_id, f"name={key.name} prefix={key.prefix}")
            await self._announce(key, "rotated", secret)
            return key, secret

    async def follow(self, registry: Registry) -> None:
        """Registry listener: take the file's `auth` section (mode, declared keys) and model names."""
        async with self._changes:
            self._mode = registry.auth.mode
            self._model_names = frozenset(n for m in registry.models for n in m.names)
            now = self._clock()
            declared: dict[str, ApiKey] = {}
            for item in registry.auth.keys:
                fresh = declared_key(item, now)
                old = self._declared.get(item.name)
                if old is None:
                    declared[item.name] = fresh
                elif (old.settings, old.sha256) == (fresh.settings, fresh.sha256):
                    declared[item.name] = old  # unchanged: keeps its dates
                else:
                    declared[item.name] = replace(fresh, created_at=old.created_at)
            # The first call announces the table whatever it holds: the stored keys must reach the
            # listeners (Envoy's key table, the quota server) after a restart too.
            if declared == self._declared and self._followed:
                return
            self._followed = True
            summary = _declared_changes(self._declared, declared)
            if declared != self._declared:
                self._audit("key.registry", "auth.keys", summary)
            self._declared = declared
            failure = await self._notify()
            if failure:
                log.error("registry keys changed (%s) but the key table push failed: %s", summary, failure)

    # Helpers
    def _changeable(self, key_id: str, *, allow_revoked: bool = False) -> ApiKey:
        key = self.get(key_id)
        if key.source == "registry":
            raise KeyConflict(f"key {key_id!r} is declared in the registry file (auth.keys): change it there")
        if key.revoked_at is not None and not allow_revoked:
            raise KeyConflict(f"key {key_id!r} is revoked; create a new key")
        return key

    def _check_name_free(self, name: str) -> None:
        if name in self._declared:
            raise KeyConflict(f"the name {name!r} is taken by a key declared in the registry file")
        if any(k.name == name for k in self._store.list_keys()):
            raise KeyConflict(f"the name {name!r} is taken by another key")

    def _check_future(self, expires_at: datetime | None, now: datetime) -> None:
        if expires_at is not None and expires_at <= now:
            raise KeyInvalid([f"expires_at: must be in the future (now: {now.isoformat()})"])

    def _check_models(self, models: tuple[str, ...] | None) -> None:
        # Against the registry followed: a name no model has is a typo. Until one is, any name passes.
        if models is None or self._model_names is None:
            return
        problems = [
            f"models[{i}]: no model or alias is named {name!r}"
            for i, name in enumerate(models)
            if name not in self._model_names
        ]
        if problems:
            raise KeyInvalid(problems)

    def _skipped_declared(self) -> list[tuple[ApiKey, str]]:
        stored = self._store.list_keys()
        names, hashes = {k.name for k in stored}, {k.sha256 for k in stored}
        skipped: list[tuple[ApiKey, str]] = []
        for key in self._declared.values():
            if key.name in names:
                skipped.append((key, "name"))
            elif key.sha256 in hashes:
                skipped.append((key, "hash"))
        return skipped

    def _declared_in_effect(self) -> list[ApiKey]:
        skipped = {k.name for k, _ in self._skipped_declared()}
        return [k for name, k in sorted(self._declared.items()) if name not in skipped]

    async def _announce(self, key: ApiKey, done: str, secret: str | None = None) -> None:
        failure = await self._notify()
        if failure:
            raise KeyPushError(
                f"key {key.id} was {done} and stored, but pushing the key table to the gateways failed "
                f"({failure}); it is pushed again with the next key change, or when this call is repeated",
                key,
                secret,
            )

    async def _notify(self) -> str | None:
        """Call every listener with the key table; the failures, joined, or None."""
        if not self._listeners:
            return None
        table = self.active_keys()
        failures = []
        for listener in self._listeners:
            try:
                await listener(table)
            except Exception as exc:  # any listener bug: the stored change must stand
                log.exception("key listener %r failed", listener)
                failures.append(f"{type(exc).__name__}: {exc}")
        return "; ".join(failures) or None


def _settings_detail(settings: KeySettings) -> str:
    return settings.model_dump_json(exclude_defaults=True)


def _declared_changes(before: dict[str, ApiKey], after: dict[str, ApiKey]) -> str:
    parts = []
    for label, names in (
        ("added", sorted(after.keys() - before.keys())),
        ("removed", sorted(before.keys() - after.keys())),
        ("changed", sorted(n for n in before.keys() & after.keys() if before[n] != after[n])),
    ):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return "; ".join(parts)
