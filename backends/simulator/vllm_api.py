"""vLLM's OpenAI server: the OpenAI routes plus ``/version``."""

from __future__ import annotations

from aiohttp import web

from . import openai_api

VLLM_VERSION = "0.6.6"


def add_routes(app: web.Application) -> None:
    openai_api.add_routes(app, openai_api.OpenAIOptions(owned_by="vllm"))
    app.router.add_get("/version", version)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": VLLM_VERSION})
