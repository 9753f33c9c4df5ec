"""The registry's `auth` section: whether the gateway checks API keys, and keys declared in the file.

The settings of a key (`KeyPolicy`) are shared by keys declared here and keys made through the admin
API (control_plane/tenancy), so both take the same values with the same checks and messages. A key in
the file is given by the SHA-256 of its whole string: the file never holds a usable key.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from control_plane.config.names import MODEL_ID, check_model_name

KEY_NAME_RULE = "1-64 characters: letters, digits and . _ : / @ + - (no spaces or control characters)"
_OWNER = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Bounds far above any real limit, low enough for the counters and Envoy token buckets they become.
MAX_RATE = 1_000_000_000
MAX_CONCURRENT = 1_000_000
MAX_BUDGET = 10**15


def check_key_name(value: str) -> str:
    if len(value) > 64 or not MODEL_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid key name: {KEY_NAME_RULE}")
    return value


def _check_owner(value: str) -> str:
    if not _OWNER.fullmatch(value):
        raise ValueError("must be 1-128 characters without control characters")
    return value


def _check_models(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("must list at least one model id or alias, or be null for every model")
    twice = sorted({m for m in value if value.count(m) > 1})
    if twice:
        raise ValueError(f"lists {', '.join(map(repr, twice))} more than once")
    return value


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


KeyName = Annotated[str, AfterValidator(check_key_name)]
Owner = Annotated[str, AfterValidator(_check_owner)]
ModelName = Annotated[str, AfterValidator(check_model_name)]
ModelList = Annotated[tuple[ModelName, ...] | None, AfterValidator(_check_models)]
# Strict: `true` or `"5"` is not a limit.
Rate = Annotated[int, Field(strict=True, ge=1, le=MAX_RATE)]
Concurrency = Annotated[int, Field(strict=True, ge=1, le=MAX_CONCURRENT)]
Budget = Annotated[int, Field(strict=True, ge=1, le=MAX_BUDGET)]
BudgetPeriod = Literal["day", "month"]
Priority = Literal["high", "default", "low"]
Expiry = Annotated[AwareDatetime | None, AfterValidator(_utc)]


class KeyPolicy(BaseModel):
    """What a key may do; every limit is optional (null: unlimited)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    owner: Owner | None = Field(default=None, description="Who the key belongs to (a team, a person).")
    models: ModelList = Field(
        default=None, description="Model ids or aliases the key may use; null: every model."
    )
    rpm_limit: Rate | None = Field(default=None, description="Requests per minute; null: unlimited.")
    tpm_limit: Rate | None = Field(
        default=None, description="Tokens (prompt + completion) per minute; null: unlimited."
    )
    max_concurrent: Concurrency | None = Field(
        default=None, description="Requests in flight at once; null: unlimited."
    )
    budget_tokens: Budget | None = Field(
        default=None, description="Tokens per `budget_period`; null: no budget."
    )
    budget_period: BudgetPeriod | None = Field(
        default=None, description="`day` or `month` (UTC calendar); required with `budget_tokens`."
    )
    expires_at: Expiry = Field(
        default=None, description="When the key stops working (ISO 8601 with a time zone); null: never."
    )
    priority: Priority = Field(
        default="default", description="Class for overload control: `high`, `default` or `low`."
    )

    @model_validator(mode="after")
    def _budget_has_period(self) -> KeyPolicy:
        if (self.budget_tokens is None) != (self.budget_period is None):
            # Raised with its own location, so the message names the field that is missing or extra.
            field = "budget_period" if self.budget_period is None else "budget_tokens"
            message = (
                "required when budget_tokens is set (day or month)"
                if field == "budget_period"
                else "required when budget_period is set"
            )
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=PydanticCustomError("budget", message), loc=(field,), input=None)],
            )
        return self


class DeclaredKey(KeyPolicy):
    """A key declared in the registry file by the SHA-256 of its whole string (read-only in the API)."""

    name: KeyName = Field(description="Unique among all keys; names the key in usage and metrics.")
    sha256: str = Field(description="SHA-256 of the whole key string: 64 lower-case hex digits.")

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str) -> str:
        if not _SHA256.fullmatch(value):
            raise ValueError(
                'must be 64 lower-case hex digits, the SHA-256 of the key (printf %s "$KEY" | sha256sum)'
            )
        return value


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["none", "api_key"] = Field(
        default="none",
        description="none: no key is checked (the local stack's default); api_key: every request needs a "
        "valid key.",
    )
    keys: tuple[DeclaredKey, ...] = Field(
        default=(), description="Keys declared in this file, by hash; the admin API adds others."
    )

    @field_validator("keys")
    @classmethod
    def _unique(cls, keys: tuple[DeclaredKey, ...]) -> tuple[DeclaredKey, ...]:
        errors: list[InitErrorDetails] = []
        names: dict[str, int] = {}
        hashes: dict[str, int] = {}
        for index, key in enumerate(keys):
            for field, value, seen in (("name", key.name, names), ("sha256", key.sha256, hashes)):
                if value in seen:
                    what = f"name {value!r}" if field == "name" else "the same hash"
                    errors.append(
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "duplicate",
                                "{what} is already used by keys[{first}]",
                                {"what": what, "first": seen[value]},
                            ),
                            loc=(index, field),
                            input=value,
                        )
                    )
                else:
                    seen[value] = index
        if errors:
            # Raised with item locations, so each line reads `auth.keys[1].name: …`.
            raise ValidationError.from_exception_data("AuthSettings", errors)
        return keys
