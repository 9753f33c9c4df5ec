"""Bearer-token protection of the admin resources."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import HTTPException, Request, status
from pydantic import SecretStr


def bearer_guard(token: SecretStr) -> Callable[[Request], None]:
    expected = token.get_secret_value().encode()

    def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or wrong admin token: send 'Authorization: Bearer <ADMIN_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
