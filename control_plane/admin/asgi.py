"""Small helpers of the admin API's pure ASGI middlewares: read a header, answer `{"detail": ...}`."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import Scope, Send


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower case), decoded as Latin-1 like Starlette does."""
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def is_chunked(scope: Scope) -> bool:
    return "chunked" in (header(scope, b"transfer-encoding") or "").lower()


def has_body(scope: Scope) -> bool:
    length = header(scope, b"content-length")
    return is_chunked(scope) or (length is not None and length.strip() not in ("", "0"))


async def send_json_error(
    send: Send,
    status_code: int,
    detail: str,
    *,
    close: bool,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer `{"detail": detail}`. `close`: the request body was not read to its end, so the connection
    must end with this answer (what is left of the body must not be parsed as the next request)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
