"""Text Generation Inference's own API: ``/generate``, ``/generate_stream``, ``/`` and ``/info``.

(TGI's OpenAI-compatible routes come from ``openai_api``; ``/health`` and ``/metrics`` are common.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
from .errors import ApiError
from .prefix_cache import prompt_blocks
from .sse import open_event_stream, send_event
from .tokens import Token, count_text_tokens, stable_seed

TGI_VERSION = "3.0.1"
TGI_SHA = "bb9095aac4a4ac6e8eb0f3a7cc9d6fb4e6b1e1f6"
_FINISH_REASONS = {"length": "length", "stop": "eos_token"}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
    app.router.add_get("/info", info)


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    inputs: str
    job: Job
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    seed: int | None


def parse_generate(body: dict[str, Any], ctx: ServerContext) -> GenerateRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ApiError(400, "`inputs` is required and must be a string")
    if not inputs:
        raise ApiError(422, "Input validation error: `inputs` cannot be empty", "validation")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "`parameters` must be an object")
    best_of = optional_int(params, "best_of", minimum=1)
    if best_of is not None and best_of != 1:
        raise ApiError(422, "Input validation error: `best_of` != 1 is not supported", "validation")
    max_new_tokens = optional_int(params, "max_new_tokens", minimum=1)
    seed = optional_int(params, "seed", minimum=0)
    prompt_tokens = count_text_tokens(inputs)
    limit = ctx.config.max_model_len
    requested = max_new_tokens is not None
    if max_new_tokens is None:
        max_new_tokens = max(1, min(ctx.config.default_max_tokens, limit - prompt_tokens))
    if prompt_tokens + max_new_tokens > limit:
        raise ApiError(
            422,
            f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {limit}. "
            f"Given: {prompt_tokens} `inputs` tokens and {max_new_tokens} `max_new_tokens`",
            "validation",
        )
    job = Job(
        prompt_tokens=prompt_tokens,
        max_tokens=max_new_tokens,
        limit_requested=requested,
        seed=stable_seed(ctx.config.seed, "generate", inputs, seed),
        prefix_blocks=prompt_blocks(ctx.config.prefix_cache_tokens, inputs),
    )
    return GenerateRequest(
        inputs=inputs,
        job=job,
        details=optional_bool(params, "details"),
        decoder_input_details=optional_bool(params, "decoder_input_details"),
        return_full_text=optional_bool(params, "return_full_text"),
        seed=seed,
    )


async def _parse(request: web.Request) -> tuple[ServerContext, GenerateRequest]:
    ctx = get_context(request)
    try:
        return ctx, parse_generate(await read_json_object(request), ctx)
    except ApiError:
        ctx.engine.record_rejected()
        raise


def _token_json(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": False}


def _prefill(inputs: str, prompt_tokens: int) -> list[dict[str, Any]]:
    """Fake prefill tokens (``decoder_input_details``): the input cut into 4-character pieces."""
    pieces = [inputs[i : i + 4] for i in range(0, len(inputs), 4)][:prompt_tokens]
    return [
        {"id": 100 + (sum(map(ord, piece)) % 30000), "text": piece, "logprob": None if i == 0 else -1.0}
        for i, piece in enumerate(pieces)
    ]


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000))


def _timing_headers(outcome: Outcome) -> dict[str, str]:
    ms = _ms
    return {
        "x-compute-type": "gpu+optimized",
        "x-compute-time": ms(outcome.inference_time),
        "x-total-time": ms(outcome.e2e),
        "x-validation-time": "0",
        "x-queue-time": ms(outcome.queue_time),
        "x-inference-time": ms(outcome.inference_time),
        "x-time-per-token": ms(outcome.time_per_output_token),
        "x-prompt-tokens": str(outcome.prompt_tokens),
        "x-generated-tokens": str(outcome.completion_tokens),
    }


async def generate(request: web.Request) -> web.StreamResponse:
    body, headers = await _generate(request)
    return web.json_response(body, headers=headers)


async def _generate(request: web.Request) -> tuple[dict[str, Any], dict[str, str]]:
    ctx, parsed = await _parse(request)
    try:
        async with ctx.engine.generation(parsed.job) as gen:
            tokens = await gen.run()
    except EngineError as exc:
        raise engine_error_to_api(exc) from None
    outcome = gen.outcome
    assert outcome is not None
    text = "".join(t.text for t in tokens)
    body: dict[str, Any] = {"generated_text": parsed.inputs + text if parsed.return_full_text else text}
    if parsed.details:
        body["details"] = {
            "finish_reason": _FINISH_REASONS[outcome.finish_reason],
            "generated_tokens": outcome.completion_tokens,
            "seed": parsed.seed,
            "prefill": _prefill(parsed.inputs, outcome.prompt_tokens) if parsed.decoder_input_details else [],
            "tokens": [_token_json(t) for t in tokens],
        }
    return body, _timing_headers(outcome)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    ctx, parsed = await _parse(request)
    try:
        async with ctx.engine.generation(parsed.job) as gen:
            return await _stream(request, gen, parsed)
    except EngineError as exc:
        raise engine_error_to_api(exc) from None


async def _stream(request: web.Request, gen: Generation, parsed: GenerateRequest) -> web.StreamResponse:
    response = await open_event_stream(request)
    try:
        texts: list[str] = []
        total = gen.job.max_tokens
        index = 0
        last: dict[str, Any] | None = None
        async for token in gen.tokens():
            index += 1
            texts.append(token.text)
            event: dict[str, Any] = {
                "index": index,
                "token": _token_json(token),
                "generated_text": None,
                "details": None,
            }
            if index < total:
                await send_event(response, event)
            else:
                last = event
        outcome = gen.outcome
        assert outcome is not None and last is not None
        text = "".join(texts)
        last["generated_text"] = parsed.inputs + text if parsed.return_full_text else text
        last["details"] = {
            "finish_reason": _FINISH_REASONS[outcome.finish_reason],
            "generated_tokens": outcome.completion_tokens,
            "seed": parsed.seed,
            "input_length": outcome.prompt_tokens,
        }
        await send_event(response, last)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; the engine counts the generation as cancelled
    return response


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """TGI's ``POST /``: ``/generate_stream`` when the body says ``"stream": true``, else ``/generate``'s
    answer in a list of one (as TGI's router does; ``text_generation.Client`` and ``InferenceClient`` read
    ``[0]``)."""
    ctx = get_context(request)
    try:
        body = await read_json_object(request)
        stream = optional_bool(body, "stream")
    except ApiError:
        ctx.engine.record_rejected()
        raise
    if stream:
        return await generate_stream(request)
    body, headers = await _generate(request)
    return web.json_response([body], headers=headers)


async def info(request: web.Request) -> web.Response:
    ctx = get_context(request)
    config = ctx.config
    latency = ctx.engine.knobs.latency
    return web.json_response(
        {
            "model_id": config.model_id,
            "model_sha": None,
            "model_dtype": "torch.float16",
            "model_device_type": "cuda",
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": latency.max_batch + ctx.engine.knobs.max_queue,
            "max_best_of": 1,
            "max_stop_sequences": 4,
            "max_input_tokens": config.max_model_len - 1,
            "max_input_length": config.max_model_len - 1,
            "max_total_tokens": config.max_model_len,
            "waiting_served_ratio": 0.3,
            "max_batch_total_tokens": config.kv_cache_tokens,
            "max_waiting_tokens": 20,
            "max_batch_size": latency.max_batch,
            "validation_workers": 2,
            "max_client_batch_size": 4,
            "router": "text-generation-router",
            "version": TGI_VERSION,
            "sha": TGI_SHA,
            "docker_label": f"sha-{TGI_SHA[:7]}",
        }
    )
