"""Request bodies of the admin API: bounded in size, and JSON the rest of the app can hold, or a 4xx.

`BodyGate` (pure ASGI, behind `AuthGate`) reads a request's body before FastAPI does:
- over `max_bytes` (1 MiB) it answers 413, by `Content-Length` before reading anything, or as soon as a
  chunked body passes the limit (nothing past the limit is kept);
- a body sent as something other than JSON gets 415;
- a body that is not JSON the control plane can store gets 400 naming the problem (`check_json`): bytes
  that are not UTF-8, a lone surrogate escape (`"\\ud800"`: valid JSON, but no UTF-8 can encode it, so
  it would fail later when stored or echoed), nesting deeper than `MAX_DEPTH`, integers longer than
  `MAX_INT_DIGITS`, non-finite numbers (`1e999`, `NaN`).
Then it hands FastAPI the buffered body unchanged; FastAPI's own validation (wrong types: 422) follows.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.admin.asgi import has_body, header, is_chunked, send_json_error

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32  # a model entry with cluster_overrides nests about 10 deep
MAX_INT_DIGITS = 64


class BadBody(ValueError):
    """A body the admin API refuses; the message says why, for the client."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadBody(f"an integer of {len(text)} digits is out of range")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadBody(f"the number {text[:40]} is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise BadBody(f"{name} is not a JSON value")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise BadBody(f"{where} contains a lone surrogate (\\u{code:04x}): not a Unicode character") from None


def check_json(body: bytes) -> Any:
    """The parsed body, or BadBody saying why the admin API cannot take it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(
            f"the body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        value = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise BadBody(f"the body is not valid JSON: {exc.msg} ({where})") from None
    except RecursionError:
        raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels") from None
    # Walk without recursion: depth, and every string (keys too) must be encodable.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise BadBody(f"the body nests deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, "a key")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_text(item, "a string")
    return value


def _is_json(content_type: str | None) -> bool:
    # A body without a type is refused too: FastAPI would not parse it as JSON, and its 422 ("Input
    # should be a valid dictionary") would hide the cause (e.g. curl -d sends a form type).
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class BodyGate:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        limit = f"the body is over the admin API's limit of {self.max_bytes} bytes"
        length = header(scope, b"content-length")
        if length is not None and not is_chunked(scope):
            if not length.strip().isdigit():
                await send_json_error(
                    send, 400, f"Content-Length {length[:40]!r} is not a number", close=True
                )
                return
            if int(length) > self.max_bytes:  # refused before a byte of it is read
                await send_json_error(send, 413, limit, close=True)
                return
        if not _is_json(header(scope, b"content-type")):
            await send_json_error(
                send, 415, "send the body as JSON (Content-Type: application/json)", close=True
            )
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # stop reading: nothing past the limit is kept
                await send_json_error(send, 413, limit, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            try:
                check_json(body)
            except BadBody as exc:
                await send_json_error(send, 400, str(exc), close=False)
                return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the client's disconnect, when it comes

    return replay
