"""Bearer-token protection of the admin API: one check, used by the ASGI gate and the route dependency.

`AuthGate` runs in front of FastAPI and answers 401 from the request's headers alone, before a byte of
its body is read: an unauthenticated client cannot make the control plane buffer anything. The routes
also declare `bearer_guard` (the same check), so the OpenAPI document shows which calls need the token
and a route mounted without the gate is still protected.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from control_plane.admin.asgi import has_body, header, send_json_error
from control_plane.store.overlay import acting_as

UNAUTHORIZED_DETAIL = "missing or wrong admin token: send 'Authorization: Bearer <ADMIN_TOKEN>'"

# Who the audit log names for a call authenticated with the admin token.
ADMIN_ACTOR = "admin-token"

# Paths anyone may read: probes, Prometheus, the status page's shell and the API docs (they hold no data).
OPEN_PATHS = frozenset({"/", "/healthz", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
OPEN_PREFIXES = ("/docs/assets/",)


def bearer_ok(authorization: str | None, expected: bytes) -> bool:
    """Whether an `Authorization` header value carries the token (constant-time comparison)."""
    scheme, _, given = (authorization or "").partition(" ")
    try:
        presented = given.strip().encode("ascii")
    except UnicodeEncodeError:  # a token is ASCII; anything else is simply wrong
        return False
    return scheme.lower() == "bearer" and secrets.compare_digest(presented, expected)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


# Declared so the OpenAPI document (and /docs's "Authorize" button) knows the scheme; the check is ours.
_SCHEME = HTTPBearer(auto_error=False, description="The admin token (`ADMIN_TOKEN`).")


def bearer_guard(token: SecretStr) -> Callable[..., None]:
    """A FastAPI dependency refusing requests without the token (401, `WWW-Authenticate: Bearer`)."""
    expected = token.get_secret_value().encode()

    def check(
        request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(_SCHEME)] = None
    ) -> None:
        if not bearer_ok(request.headers.get("authorization"), expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail=UNAUTHORIZED_DETAIL,
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


class AuthGate:
    """Pure ASGI middleware: every path but the open ones needs the bearer token, checked on the headers.

    Authenticated requests run with the audit actor `admin-token` (a context variable the store reads).
    """

    def __init__(self, app: ASGIApp, token: SecretStr) -> None:
        self.app = app
        self._expected = token.get_secret_value().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        if not bearer_ok(header(scope, b"authorization"), self._expected):
            # Answered from the headers alone: the body (however large) is never read.
            await send_json_error(
                send,
                401,
                UNAUTHORIZED_DETAIL,
                close=has_body(scope),
                extra=[(b"www-authenticate", b"Bearer")],
            )
            return
        with acting_as(ADMIN_ACTOR):
            await self.app(scope, receive, send)
