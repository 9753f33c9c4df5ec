"""The key domain: secrets, hashes, ids, settings and patches, and the API view (no secret, no hash)."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from control_plane.config.auth import DeclaredKey
from control_plane.tenancy.errors import KeyIdInvalid, KeyInvalid
from control_plane.tenancy.keys import (
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

pytestmark = pytest.mark.unit

NOW = datetime(2030, 6, 1, 12, tzinfo=UTC)


def test_secrets_are_random_prefixed_and_hashed_whole() -> None:
    secrets_made = {new_secret() for _ in range(200)}
    assert len(secrets_made) == 200
    for secret in secrets_made:
        assert re.fullmatch(r"sk-gw-[A-Za-z0-9_-]{43}", secret), secret
        assert key_hash(secret) == hashlib.sha256(secret.encode()).hexdigest()
        assert secret_prefix(secret) == secret[:12] and secret_prefix(secret).startswith("sk-gw-")
    assert key_hash("sk-gw-é") == hashlib.sha256("sk-gw-é".encode()).hexdigest()


def test_ids() -> None:
    assert re.fullmatch(r"key_[0-9a-f]{16}", new_key_id())
    assert len({new_key_id() for _ in range(200)}) == 200
    for good in ("key_0123456789abcdef", "reg_team-a", "reg_org/team"):
        assert check_key_id(good) == good
    for bad in (
        "key_0123",
        "key_0123456789ABCDEF",
        "team-a",
        "reg_",
        "reg_a b",
        "key_0123456789abcdef\n",
        "",
    ):
        with pytest.raises(KeyIdInvalid):
            check_key_id(bad)


def test_settings_defaults_and_refusals() -> None:
    settings = KeySettings(name="team-a")
    assert settings.models is None and settings.rpm_limit is None and settings.priority == "default"
    with pytest.raises(ValidationError) as info:
        KeySettings.model_validate({"name": "a", "colour": "red"})
    assert info.value.errors()[0]["loc"] == ("colour",)
    with pytest.raises(ValidationError) as info:
        KeySettings.model_validate({"name": "a", "budget_tokens": 5})
    assert info.value.errors()[0]["loc"] == ("budget_period",)
    with pytest.raises(ValidationError):
        KeySettings.model_validate({"name": "a", "expires_at": "2031-01-01T00:00:00"})  # naive
    with pytest.raises(ValidationError):
        KeySettings.model_validate({})


def _key(**settings: object) -> ApiKey:
    return ApiKey(
        id="key_0123456789abcdef",
        settings=KeySettings.model_validate({"name": "team-a", **settings}),
        sha256=key_hash("sk-gw-secret"),
        prefix="sk-gw-secret"[:12],
        created_at=NOW,
        updated_at=NOW,
    )


def test_is_active_until_revoked_or_expired() -> None:
    key = _key(expires_at=NOW + timedelta(hours=1))
    assert key.is_active(NOW)
    assert not key.is_active(NOW + timedelta(hours=1))
    assert _key().is_active(NOW + timedelta(days=10_000))
    from dataclasses import replace

    assert not replace(_key(), revoked_at=NOW).is_active(NOW)


def test_the_view_has_no_hash_and_no_secret() -> None:
    view = _key(rpm_limit=5, models=["qwen2"]).view(NOW)
    assert "sha256" not in view and "key" not in view
    assert key_hash("sk-gw-secret") not in str(view)
    assert view["prefix"] == "sk-gw-secret" and view["models"] == ["qwen2"] and view["rpm_limit"] == 5
    assert view["active"] is True and view["revoked_at"] is None and view["source"] == "admin"
    assert view["created_at"] == NOW.isoformat()


def test_a_patch_changes_only_what_it_names_and_null_clears() -> None:
    settings = KeySettings(
        name="a", owner="x", rpm_limit=5, priority="high", budget_tokens=9, budget_period="day"
    )
    patched = KeyPatch.model_validate({"rpm_limit": None, "tpm_limit": 7, "priority": None}).apply(settings)
    assert patched.rpm_limit is None and patched.tpm_limit == 7 and patched.priority == "default"
    assert patched.owner == "x" and patched.budget_tokens == 9 and patched.name == "a"
    assert KeyPatch().apply(settings) == settings


def test_a_patch_is_checked_as_a_whole() -> None:
    settings = KeySettings(name="a", budget_tokens=9, budget_period="day")
    with pytest.raises(KeyInvalid, match=r"budget_tokens: required when budget_period is set"):
        KeyPatch.model_validate({"budget_tokens": None}).apply(settings)
    cleared = KeyPatch.model_validate({"budget_tokens": None, "budget_period": None}).apply(settings)
    assert cleared.budget_tokens is None and cleared.budget_period is None
    with pytest.raises(KeyInvalid, match="name: cannot be null"):
        KeyPatch.model_validate({"name": None}).apply(settings)
    with pytest.raises(ValidationError):
        KeyPatch.model_validate({"rpm_limit": -1})
    with pytest.raises(ValidationError):
        KeyPatch.model_validate({"sha256": "0" * 64})


def test_a_declared_key_becomes_a_registry_record() -> None:
    declared = DeclaredKey(name="ci", sha256=key_hash("sk-gw-ci"), rpm_limit=3)
    key = declared_key(declared, NOW)
    assert key.id == "reg_ci" and key.source == "registry" and key.prefix is None
    assert key.sha256 == key_hash("sk-gw-ci") and key.settings.rpm_limit == 3 and key.name == "ci"
