"""Runtime control: ``POST /sim/control``, ``GET /sim/state``, and the ``/health`` check they drive.

These handlers never wait on the engine, so they stay responsive while generation requests hang.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .context import get_context, read_json_object
from .errors import ApiError

CRASH_DELAY_S = 0.05


def add_routes(app: web.Application) -> None:
    app.router.add_post("/sim/control", control)
    app.router.add_get("/sim/state", state)
    app.router.add_get("/health", health)


async def control(request: web.Request) -> web.Response:
    """Apply knob changes (any subset; see ``Engine.apply_control``) and return the new state.

    ``{"crash": true}`` answers 200 and then ends the process abruptly (exit status 1).
    """
    ctx = get_context(request)
    body = await read_json_object(request)
    crash = body.pop("crash", False)
    if not isinstance(crash, bool):
        raise ApiError(400, "crash must be a boolean")
    try:
        ctx.engine.apply_control(body)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    snapshot = ctx.engine.snapshot()
    if crash:
        snapshot["crash"] = True
        asyncio.get_running_loop().call_later(CRASH_DELAY_S, ctx.exit_process, 1)
    return web.json_response(snapshot)


async def state(request: web.Request) -> web.Response:
    return web.json_response(get_context(request).engine.snapshot())


async def health(request: web.Request) -> web.Response:
    """200 with an empty body, or 503 when the ``healthy`` knob is off."""
    ctx = get_context(request)
    if ctx.engine.knobs.healthy:
        return web.Response(status=200)
    raise ApiError(503, "unhealthy (healthy knob is off)", "unhealthy")
