"""Per-app state shared by the HTTP handlers, and small request helpers."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .config import SimConfig
from .engine import Engine, EngineError, Overloaded
from .errors import ApiError, ErrorStyle


@dataclass(slots=True)
class ServerContext:
    """Everything a handler needs; stored on the app under ``CONTEXT``."""

    config: SimConfig
    engine: Engine
    style: ErrorStyle
    exit_process: Callable[[int], None] = os._exit
    """Called by the ``crash`` knob (tests replace it)."""
    started_at: int = field(default_factory=lambda: int(time.time()))
    ready_at: float = 0.0
    """``time.monotonic()`` from which the model is loaded (see ``SimConfig.load_time_s``)."""

    @property
    def loading(self) -> bool:
        return time.monotonic() < self.ready_at

    def check_model(self, model: object, *, accept_any: bool) -> None:
        """404 (vLLM's message) for a ``model`` the server does not serve; absent = default model."""
        if model is None:
            return
        if not isinstance(model, str):
            raise ApiError(400, "`model` must be a string")
        if accept_any or model in self.config.accepted_model_names:
            return
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")


CONTEXT = web.AppKey("sim_context", ServerContext)


def get_context(request: web.Request) -> ServerContext:
    return request.app[CONTEXT]


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; ``ApiError(400)`` otherwise."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return body


def engine_error_to_api(exc: EngineError) -> ApiError:
    """Map a refused request to its HTTP error (503 when the queue is full, 500 otherwise)."""
    if isinstance(exc, Overloaded):
        return ApiError(503, f"Model is overloaded: {exc}")
    return ApiError(500, f"Request failed during generation: {exc}")


def optional_int(body: dict[str, Any], key: str, *, minimum: int) -> int | None:
    """An optional integer field with a lower bound; ``ApiError(400)`` when malformed."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"`{key}` must be an integer")
    if value < minimum:
        raise ApiError(400, f"`{key}` must be >= {minimum}, got {value}")
    return value


def optional_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"`{key}` must be a boolean")
    return value
