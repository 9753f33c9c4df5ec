"""The registry's `auth` section: defaults, declared keys, and errors that name their path."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest

from control_plane.config import parse_registry
from control_plane.errors import ConfigError
from control_plane.store.overlay import AdminStore

pytestmark = pytest.mark.unit

HASH = hashlib.sha256(b"sk-gw-declared").hexdigest()
OTHER = hashlib.sha256(b"sk-gw-other").hexdigest()


def _doc(auth: Any) -> dict[str, Any]:
    return {"allow_empty": True, "auth": auth}


def problems_of(auth: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_registry(_doc(auth), "test.yaml")
    return info.value.problems


def test_auth_is_off_without_keys_by_default() -> None:
    registry = parse_registry(_doc({}))
    assert registry.auth.mode == "none" and registry.auth.keys == ()
    assert parse_registry({"allow_empty": True}).auth == registry.auth


def test_declared_keys_load_with_their_settings() -> None:
    registry = parse_registry(
        _doc(
            {
                "mode": "api_key",
                "keys": [
                    {
                        "name": "team-a",
                        "sha256": HASH,
                        "owner": "Team A",
                        "models": ["qwen2", "org/llama3"],
                        "rpm_limit": 60,
                        "tpm_limit": 10_000,
                        "max_concurrent": 4,
                        "budget_tokens": 1_000_000,
                        "budget_period": "month",
                        "expires_at": "2031-01-01T01:00:00+01:00",
                        "priority": "high",
                    },
                    {"name": "team-b", "sha256": OTHER},
                ],
            }
        )
    )
    first, second = registry.auth.keys
    assert registry.auth.mode == "api_key"
    assert first.models == ("qwen2", "org/llama3") and first.rpm_limit == 60 and first.priority == "high"
    assert first.expires_at == datetime(2031, 1, 1, tzinfo=UTC)  # kept in UTC
    assert second.models is None and second.rpm_limit is None and second.priority == "default"


def test_the_auth_section_survives_the_admin_overlay() -> None:
    # The overlay re-validates the registry from its JSON dump: declared keys must come through intact.
    registry = parse_registry(
        _doc(
            {"mode": "api_key", "keys": [{"name": "a", "sha256": HASH, "expires_at": "2031-01-01T00:00:00Z"}]}
        )
    )
    assert AdminStore(":memory:").apply(registry).registry.auth == registry.auth


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"mode": "jwt"}, "auth.mode: Input should be 'none' or 'api_key'"),
        ({"modes": "none"}, "auth.modes: Extra inputs are not permitted"),
        ({"keys": [{"name": "a", "sha256": HASH.upper()}]}, "auth.keys[0].sha256: must be 64 lower-case hex"),
        ({"keys": [{"name": "a", "sha256": HASH[:63]}]}, "auth.keys[0].sha256: must be 64 lower-case hex"),
        ({"keys": [{"name": "a"}]}, "auth.keys[0].sha256: Field required"),
        ({"keys": [{"sha256": HASH}]}, "auth.keys[0].name: Field required"),
        ({"keys": [{"name": "a b", "sha256": HASH}]}, "auth.keys[0].name: 'a b' is not a valid key name"),
        ({"keys": [{"name": "x" * 65, "sha256": HASH}]}, "auth.keys[0].name: "),
        ({"keys": [{"name": "a\n", "sha256": HASH}]}, "auth.keys[0].name: "),
        (
            {"keys": [{"name": "a", "sha256": HASH}, {"name": "a", "sha256": OTHER}]},
            "auth.keys[1].name: name 'a' is already used by keys[0]",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH}, {"name": "b", "sha256": HASH}]},
            "auth.keys[1].sha256: the same hash is already used by keys[0]",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "budget_tokens": 10}]},
            "auth.keys[0].budget_period: required when budget_tokens is set",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "budget_period": "week"}]},
            "auth.keys[0].budget_period: Input should be 'day' or 'month'",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "budget_period": "day"}]},
            "auth.keys[0].budget_tokens: required when budget_period is set",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "rpm_limit": 0}]},
            "auth.keys[0].rpm_limit: Input should be greater",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "tpm_limit": "5"}]},
            "auth.keys[0].tpm_limit: Input should be a valid integer",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "max_concurrent": True}]},
            "auth.keys[0].max_concurrent: Input should be a valid integer",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "models": []}]},
            "auth.keys[0].models: must list at least one model",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "models": ["m", "m"]}]},
            "auth.keys[0].models: lists 'm' more than once",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "models": ["ok", "bad name"]}]},
            "auth.keys[0].models[1]: 'bad name' is not a valid model name",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "expires_at": "2031-01-01T00:00:00"}]},
            "auth.keys[0].expires_at: Input should have timezone info",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "priority": "urgent"}]},
            "auth.keys[0].priority: Input should be 'high', 'default' or 'low'",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "owner": "x" * 129}]},
            "auth.keys[0].owner: must be 1-128 characters",
        ),
        (
            {"keys": [{"name": "a", "sha256": HASH, "key": "sk-gw-clear"}]},
            "auth.keys[0].key: Extra inputs are not permitted",
        ),
    ],
)
def test_auth_errors_name_their_path(auth: Any, expected: str) -> None:
    problems = problems_of(auth)
    assert any(p.startswith(expected) for p in problems), problems


def test_an_expired_declared_key_is_still_a_valid_file() -> None:
    # Expiry is judged when the key is used, not when the file is read: a past date must not make every
    # later reload of the file fail.
    registry = parse_registry(
        _doc({"keys": [{"name": "a", "sha256": HASH, "expires_at": "2001-01-01T00:00:00Z"}]})
    )
    assert registry.auth.keys[0].expires_at == datetime(2001, 1, 1, tzinfo=UTC)
