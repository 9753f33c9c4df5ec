"""The OpenAI-compatible API shared by TGI, vLLM and SGLang: chat/completions, completions, models.

Responses follow vLLM's OpenAI server; every response and chunk carries ``id``, ``created``,
``model`` (the model id) and ``system_fingerprint`` (the endpoint id).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from .context import (
    ServerContext,
    engine_error_to_api,
    get_context,
    optional_bool,
    optional_int,
    read_json_object,
)
from .engine import EngineError, Generation, Job, Outcome
from .errors import ApiError, ErrorStyle
from .prefix_cache import prompt_blocks
from .sse import open_event_stream, send_event
from .tokens import chat_prompt_text, count_chat_tokens, count_text_tokens, stable_seed

Kind = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    kind: Kind
    job: Job
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class OpenAIOptions:
    """How one engine's flavour of the API differs."""

    accept_any_model: bool = False
    """TGI serves whatever ``model`` the client names."""
    owned_by: str = "vllm"


OPTIONS = web.AppKey("sim_openai_options", OpenAIOptions)


def add_routes(app: web.Application, options: OpenAIOptions) -> None:
    app[OPTIONS] = options
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)


# ------------------------------------------------------------------ parsing
def _parse_common(body: dict[str, Any], ctx: ServerContext, options: OpenAIOptions) -> dict[str, Any]:
    ctx.check_model(body.get("model"), accept_any=options.accept_any_model)
    n = optional_int(body, "n", minimum=1)
    if n is not None and n != 1:
        raise ApiError(400, "Only n=1 is supported by this server")
    max_tokens = optional_int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", minimum=1)
    seed = optional_int(body, "seed", minimum=-(2**63))
    stream = optional_bool(body, "stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise ApiError(400, "`stream_options` must be an object")
        if not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.")
        include_usage = optional_bool(stream_options, "include_usage")
    return {"max_tokens": max_tokens, "seed": seed, "stream": stream, "include_usage": include_usage}


def _make_job(
    ctx: ServerContext,
    prompt_tokens: int,
    max_tokens: int | None,
    seed_parts: tuple[object, ...],
    what: str,
    prompt_text: str,
) -> Job:
    limit = ctx.config.max_model_len
    requested = max_tokens is not None
    if max_tokens is None:
        max_tokens = max(1, min(ctx.config.default_max_tokens, limit - prompt_tokens))
    if prompt_tokens + max_tokens > limit:
        if ctx.style is ErrorStyle.TGI:
            raise ApiError(
                422,
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. "
                f"Given: {prompt_tokens} `inputs` tokens and {max_tokens} `max_new_tokens`",
                "validation",
            )
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
        )
    return Job(
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        limit_requested=requested,
        seed=stable_seed(ctx.config.seed, *seed_parts),
        prefix_blocks=prompt_blocks(ctx.config.prefix_cache_tokens, prompt_text),
    )


def parse_chat(body: dict[str, Any], ctx: ServerContext, options: OpenAIOptions) -> OpenAIRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` is required and must be a non-empty list")
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message must be an object with a string `role`")
    common = _parse_common(body, ctx, options)
    # The rendered conversation: a later turn (history resent) starts with an earlier turn's text, so
    # their prefix-cache blocks are shared.
    text = chat_prompt_text(messages)
    job = _make_job(
        ctx,
        count_chat_tokens(messages),
        common["max_tokens"],
        ("chat", text, common["seed"]),
        "messages",
        text,
    )
    return OpenAIRequest("chat", job, common["stream"], common["include_usage"])


def _prompt_tokens(prompt: object) -> tuple[int, str]:
    """Token count and seed text of a completion ``prompt`` (a string or a list of token ids)."""
    if isinstance(prompt, str):
        return count_text_tokens(prompt), prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return len(prompt), " ".join(str(t) for t in prompt)
        if len(prompt) == 1:
            return _prompt_tokens(prompt[0])
        if all(isinstance(p, str | list) for p in prompt):
            raise ApiError(400, "Only a single prompt per request is supported by this server")
    raise ApiError(400, "`prompt` is required: a string or a list of token ids")


def parse_completion(body: dict[str, Any], ctx: ServerContext, options: OpenAIOptions) -> OpenAIRequest:
    prompt_tokens, prompt_text = _prompt_tokens(body.get("prompt"))
    if prompt_tokens == 0:
        raise ApiError(400, "`prompt` must not be empty")
    common = _parse_common(body, ctx, options)
    job = _make_job(
        ctx,
        prompt_tokens,
        common["max_tokens"],
        ("completion", prompt_text, common["seed"]),
        "prompt",
        prompt_text,
    )
    return OpenAIRequest("completion", job, common["stream"], common["include_usage"])


# ---------------------------------------------------------------- rendering
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Renderer:
    """Builds the JSON objects of one response (shared id and timestamp)."""

    def __init__(self, ctx: ServerContext, kind: Kind) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = ctx.config.model_id
        self.fingerprint = ctx.config.endpoint_id

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def full(self, text: str, outcome: Outcome) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
        else:
            choice["text"] = text
        choice.update({"logprobs": None, "finish_reason": outcome.finish_reason, "stop_reason": None})
        body = self._envelope("chat.completion" if self.kind == "chat" else "text_completion")
        body["choices"] = [choice]
        body["usage"] = usage(outcome.prompt_tokens, outcome.completion_tokens)
        return body

    def chunk(
        self, text: str | None, finish_reason: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice.update({"logprobs": None, "finish_reason": finish_reason})
        if self.kind == "completion" or finish_reason is not None:
            choice["stop_reason"] = None
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = [choice]
        return body

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        body["usage"] = usage(outcome.prompt_tokens, outcome.completion_tokens)
        return body


# ----------------------------------------------------------------- handlers
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "completion")


async def _handle(request: web.Request, kind: Kind) -> web.StreamResponse:
    ctx = get_context(request)
    options = request.app[OPTIONS]
    try:
        body = await read_json_object(request)
        parsed = (parse_chat if kind == "chat" else parse_completion)(body, ctx, options)
    except ApiError:
        ctx.engine.record_rejected()
        raise
    renderer = _Renderer(ctx, kind)
    try:
        async with ctx.engine.generation(parsed.job) as gen:
            if parsed.stream:
                return await _stream(request, gen, renderer, parsed.include_usage)
            tokens = await gen.run()
    except EngineError as exc:
        raise engine_error_to_api(exc) from None
    assert gen.outcome is not None
    return web.json_response(renderer.full("".join(t.text for t in tokens), gen.outcome))


async def _stream(
    request: web.Request, gen: Generation, renderer: _Renderer, include_usage: bool
) -> web.StreamResponse:
    response = await open_event_stream(request)
    try:
        first = True
        async for token in gen.tokens():
            if first:
                first = False
                if renderer.kind == "chat":
                    await send_event(response, renderer.chunk("", role=True))
            await send_event(response, renderer.chunk(token.text))
        assert gen.outcome is not None
        if first and renderer.kind == "chat":
            await send_event(response, renderer.chunk("", role=True))
        await send_event(
            response, renderer.chunk("" if renderer.kind == "completion" else None, gen.outcome.finish_reason)
        )
        if include_usage:
            await send_event(response, renderer.usage_chunk(gen.outcome))
        await send_event(response, "[DONE]")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; the engine counts the generation as cancelled
    return response


async def list_models(request: web.Request) -> web.Response:
    ctx = get_context(request)
    options = request.app[OPTIONS]
    config = ctx.config
    names = (config.model_id,) if options.accept_any_model else config.accepted_model_names
    data = [
        {
            "id": name,
            "object": "model",
            "created": ctx.started_at,
            "owned_by": config.model_id if options.accept_any_model else options.owned_by,
            "root": config.model_id,
            "parent": None,
            "max_model_len": config.max_model_len,
        }
        for name in names
    ]
    return web.json_response({"object": "list", "data": data})
