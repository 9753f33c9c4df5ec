"""API keys: their settings, the stored record (never the clear key), and how keys are made and hashed.

A key is `sk-gw-` followed by 43 URL-safe characters (32 random bytes). Only its SHA-256 is kept, with
its first 12 characters (`prefix`, e.g. `sk-gw-AbCdEf`) so people can tell their keys apart.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from control_plane.config.auth import (
    Budget,
    BudgetPeriod,
    Concurrency,
    DeclaredKey,
    Expiry,
    KeyName,
    KeyPolicy,
    ModelList,
    Owner,
    Priority,
    Rate,
    check_key_name,
)
from control_plane.config.loader import validation_problems
from control_plane.tenancy.errors import KeyIdInvalid, KeyInvalid

SECRET_PREFIX = "sk-gw-"
PREFIX_LENGTH = 12
Source = Literal["admin", "registry"]
_STORED_ID = re.compile(r"key_[0-9a-f]{16}")
REGISTRY_ID_PREFIX = "reg_"


class KeySettings(KeyPolicy):
    """Everything an operator sets on a key (the body of `POST /admin/keys`); unknown fields refused."""

    name: KeyName = Field(description="Unique among all keys; names the key in usage and metrics.")


class KeyPatch(BaseModel):
    """The body of `PATCH /admin/keys/{id}`: only the fields given change; null clears one (back to its
    default: no limit, every model, `default` priority). The result is checked as a whole (`apply`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: KeyName | None = None
    owner: Owner | None = None
    models: ModelList = None
    rpm_limit: Rate | None = None
    tpm_limit: Rate | None = None
    max_concurrent: Concurrency | None = None
    budget_tokens: Budget | None = None
    budget_period: BudgetPeriod | None = None
    expires_at: Expiry = None
    priority: Priority | None = None

    def apply(self, settings: KeySettings) -> KeySettings:
        """The settings with this patch applied, all checked again (KeyInvalid naming the fields)."""
        document = settings.model_dump()
        for field in self.model_fields_set:
            value = getattr(self, field)
            if value is None and field == "name":
                raise KeyInvalid(["name: cannot be null"])
            document[field] = value if value is not None else KeySettings.model_fields[field].default
        try:
            return KeySettings.model_validate(document)
        except ValidationError as exc:
            raise KeyInvalid(validation_problems(exc)) from None


@dataclass(frozen=True)
class ApiKey:
    """A key as stored: its settings and hash, never the key itself."""

    id: str
    settings: KeySettings
    sha256: str
    prefix: str | None  # None for keys declared in the registry file (only their hash is known)
    created_at: datetime
    updated_at: datetime
    source: Source = "admin"
    revoked_at: datetime | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    def is_active(self, now: datetime) -> bool:
        """Not revoked and not expired: Envoy must accept it."""
        expires = self.settings.expires_at
        return self.revoked_at is None and (expires is None or now < expires)

    def with_settings(self, settings: KeySettings, now: datetime) -> ApiKey:
        return replace(self, settings=settings, updated_at=now)

    def view(self, now: datetime) -> dict[str, Any]:
        """The admin API's view. No `sha256`: not the key, but an unsalted hash lets a weak key chosen for
        the registry file be guessed offline, and nobody needs it to manage keys."""
        return {
            "id": self.id,
            **self.settings.model_dump(mode="json"),
            "prefix": self.prefix,
            "source": self.source,
            "active": self.is_active(now),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def key_hash(secret: str) -> str:
    """What is stored and declared: the SHA-256 (hex) of the whole key's UTF-8 bytes."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_prefix(secret: str) -> str:
    return secret[:PREFIX_LENGTH]


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def registry_key_id(name: str) -> str:
    """Stable across reloads and restarts: the same declared name is the same key."""
    return REGISTRY_ID_PREFIX + name


def check_key_id(value: str) -> str:
    """A key id from a URL path, or KeyIdInvalid (422): `key_` + 16 hex digits, or `reg_` + a key name."""
    if _STORED_ID.fullmatch(value):
        return value
    if value.startswith(REGISTRY_ID_PREFIX):
        try:
            check_key_name(value.removeprefix(REGISTRY_ID_PREFIX))
            return value
        except ValueError:
            pass
    raise KeyIdInvalid(
        f"{value!r} is not a key id: key_ and 16 hex digits, or reg_ and a declared key's name"
    )


def declared_key(declared: DeclaredKey, since: datetime) -> ApiKey:
    """A key of the registry file as a record (`since`: when this control plane first saw it)."""
    settings = KeySettings.model_validate(declared.model_dump(exclude={"sha256"}))
    return ApiKey(
        id=registry_key_id(declared.name),
        settings=settings,
        sha256=declared.sha256,
        prefix=None,
        created_at=since,
        updated_at=since,
        source="registry",
    )
