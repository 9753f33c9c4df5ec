"""SGLang's server: the OpenAI routes plus ``/get_model_info``, ``/get_server_info``, ``/health_generate``."""

from __future__ import annotations

from aiohttp import web

from . import openai_api
from .context import get_context
from .control import health

SGLANG_VERSION = "0.4.1"


def add_routes(app: web.Application) -> None:
    openai_api.add_routes(app, openai_api.OpenAIOptions(owned_by="sglang"))
    app.router.add_get("/get_model_info", get_model_info)
    app.router.add_get("/get_server_info", get_server_info)
    app.router.add_get("/health_generate", health)


async def get_model_info(request: web.Request) -> web.Response:
    config = get_context(request).config
    return web.json_response(
        {"model_path": config.model_id, "tokenizer_path": config.model_id, "is_generation": True}
    )


async def get_server_info(request: web.Request) -> web.Response:
    ctx = get_context(request)
    config = ctx.config
    return web.json_response(
        {
            "model_path": config.model_id,
            "served_model_name": config.served_names[0] if config.served_names else config.model_id,
            "context_length": config.max_model_len,
            "max_running_requests": ctx.engine.knobs.latency.max_batch,
            "max_total_num_tokens": config.kv_cache_tokens,
            "version": SGLANG_VERSION,
        }
    )
