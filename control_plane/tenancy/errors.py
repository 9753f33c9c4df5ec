"""Typed errors of key management; the admin API maps them to HTTP (admin/keys.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_plane.errors import ConflictError, GatewayError, InvalidNameError, NotFoundError

if TYPE_CHECKING:
    from control_plane.tenancy.keys import ApiKey


class KeyNotFound(NotFoundError):
    """No key has this id (404)."""


class KeyIdInvalid(InvalidNameError):
    """A path that no key id can be (422, before any lookup)."""


class KeyConflict(ConflictError):
    """A taken name, a key declared in the registry file (read-only here), or a revoked key (409)."""


class KeyInvalid(GatewayError):
    """Settings that cannot be kept: `problems` holds one `field: message` line each (422)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class KeyPushError(GatewayError):
    """The change is stored, but a listener (the push of the key table to the Envoys) failed (503).

    `record` is the stored key; `secret` the clear key of a creation or rotation, so the one chance to
    show it is not lost to the failure.
    """

    def __init__(self, message: str, record: ApiKey, secret: str | None = None) -> None:
        self.record = record
        self.secret = secret
        super().__init__(message)
