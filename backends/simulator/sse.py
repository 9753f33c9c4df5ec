"""Server-sent events: one ``data: ...`` event per write, flushed immediately."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    """Send the headers of a ``text/event-stream`` response."""
    response = web.StreamResponse(
        status=200,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.content_type = "text/event-stream"
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, data: dict[str, Any] | str) -> None:
    """Write one event; dicts are sent as compact JSON."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    await response.write(f"data: {payload}\n\n".encode())
