"""Refuse request paths with control characters before routing.

Starlette's route patterns end in `$`, which also matches before a final newline, and `{x:path}`'s `.*`
stops at one: `DELETE /admin/models/qwen2%0A` would otherwise remove `qwen2`. No name can contain a
control character (config/schema.py), so such a path names nothing: 422, never a lookup.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Receive, Scope, Send

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class PathGate:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _CONTROL.search(scope.get("path", "")):
            body = json.dumps(
                {"detail": f"{scope['path']!r} is not a valid path: names contain no control characters"}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 422,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self._app(scope, receive, send)
