"""Builds the aiohttp application of one simulated server, and runs it on a socket."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from . import control, metrics, openai_api, sglang_api, tei_api, tgi_api, vllm_api
from .config import EngineKind, SimConfig
from .context import CONTEXT, ServerContext
from .engine import Engine
from .errors import ApiError, ErrorStyle, error_response

ENDPOINT_HEADER = "x-sim-endpoint-id"
MAX_BODY_BYTES = 16 * 1024 * 1024
SHUTDOWN_TIMEOUT_S = 1.0
"""How long a stopping server waits for in-flight requests before cancelling them."""


def error_style(kind: EngineKind) -> ErrorStyle:
    return ErrorStyle.OPENAI if kind in (EngineKind.VLLM, EngineKind.SGLANG) else ErrorStyle.TGI


@web.middleware
async def _api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(request.app[CONTEXT].style, exc.status, exc.message, exc.error_type)


# Answered while loading: scraping and the test controls, as a real engine's metrics would be.
_SERVED_WHILE_LOADING = frozenset({"/metrics", "/sim/state", "/sim/control"})


@web.middleware
async def _loading_gate(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """503 ``model loading`` (health and inference) until the configured load time has passed, like
    llama.cpp's server while it loads its weights; the launcher's readiness wait polls ``/health``."""
    if request.app[CONTEXT].loading and request.path not in _SERVED_WHILE_LOADING:
        raise ApiError(503, "model loading", "model_loading")
    return await handler(request)


async def _abort_in_flight(app: web.Application) -> None:
    """On shutdown, abort generations (hung ones included) instead of waiting for them."""
    app[CONTEXT].engine.abort_all()


async def _endpoint_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[ENDPOINT_HEADER] = request.app[CONTEXT].config.endpoint_id


def build_app(config: SimConfig, *, exit_process: Callable[[int], None] = os._exit) -> web.Application:
    """The app for ``config.engine``: its real API routes, ``/metrics``, ``/health`` and ``/sim/*``."""
    ctx = ServerContext(
        config=config,
        engine=Engine(config),
        style=error_style(config.engine),
        exit_process=exit_process,
        ready_at=time.monotonic() + config.load_time_s,
    )
    app = web.Application(middlewares=[_api_errors, _loading_gate], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT] = ctx
    app.on_response_prepare.append(_endpoint_header)
    app.on_shutdown.append(_abort_in_flight)
    control.add_routes(app)
    metrics.add_routes(app)
    kind = config.engine
    if kind is EngineKind.TGI:
        openai_api.add_routes(app, openai_api.OpenAIOptions(accept_any_model=True, owned_by=config.model_id))
        tgi_api.add_routes(app)
    elif kind is EngineKind.VLLM:
        vllm_api.add_routes(app)
    elif kind is EngineKind.SGLANG:
        sglang_api.add_routes(app)
    else:
        tei_api.add_routes(app)
    return app


def engine_of(app: web.Application) -> Engine:
    """The engine behind an app built by ``build_app`` (for tests and embedding)."""
    return app[CONTEXT].engine


def context_of(app: web.Application) -> ServerContext:
    return app[CONTEXT]


@dataclass(slots=True)
class RunningServer:
    """A started server; ``port`` is the bound port (useful when asked for port 0)."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Listen on ``host:port``; handlers are cancelled when their client disconnects (as real servers
    abort such requests)."""
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return RunningServer(runner=runner, host=host, port=int(bound))
