"""Text Embeddings Inference: ``/embed``, ``/rerank``, ``/v1/embeddings`` and ``/info``.

No generation: each request pays a prefill-only cost through the same scheduler. Inputs longer than
``MAX_INPUT_LENGTH`` tokens are truncated (as TEI with ``--auto-truncate``).

Keys TEI does not know (such as the ``model`` a client puts in an ``/embed`` body so that the gateway can
route it) are ignored, as TEI's own request parsing does. ``/v1/rerank`` (Jina/Cohere shape, as vLLM's
pooling models serve it) is an addition of the simulator: a real TEI answers only ``/rerank``.
"""

from __future__ import annotations

import base64
import struct
import uuid
from typing import Any

from aiohttp import web

from .context import ServerContext, engine_error_to_api, get_context, optional_bool, read_json_object
from .embeddings import embed_text, rerank_logit, sigmoid
from .engine import EngineError, Job
from .errors import ApiError
from .tokens import count_text_tokens

TEI_VERSION = "1.5.0"
MAX_INPUT_LENGTH = 512
MAX_CLIENT_BATCH_SIZE = 32
SPECIAL_TOKENS_PER_INPUT = 2


def add_routes(app: web.Application) -> None:
    app.router.add_post("/", root)
    app.router.add_post("/embed", embed)
    app.router.add_post("/rerank", rerank)
    app.router.add_post("/v1/embeddings", openai_embeddings)
    app.router.add_post("/v1/rerank", openai_rerank)
    app.router.add_get("/info", info)


def input_tokens(text: str) -> int:
    return min(MAX_INPUT_LENGTH, count_text_tokens(text) + SPECIAL_TOKENS_PER_INPUT)


def _texts(value: object, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if not value:
            raise ApiError(400, "Input validation error: `inputs` cannot be empty", "empty")
        if len(value) > MAX_CLIENT_BATCH_SIZE:
            raise ApiError(
                413,
                f"batch size {len(value)} > maximum allowed batch size {MAX_CLIENT_BATCH_SIZE}",
                "validation",
            )
        return list(value)
    raise ApiError(400, f"`{field}` is required: a string or a list of strings", "validation")


async def _run(ctx: ServerContext, prompt_tokens: int) -> None:
    """Pay the prefill-only latency of ``prompt_tokens`` (queueing like any other request)."""
    try:
        async with ctx.engine.generation(Job(prompt_tokens=prompt_tokens, max_tokens=0)) as gen:
            await gen.run()
    except EngineError as exc:
        raise engine_error_to_api(exc) from None


async def _body(request: web.Request) -> tuple[ServerContext, dict[str, Any]]:
    ctx = get_context(request)
    try:
        return ctx, await read_json_object(request)
    except ApiError:
        ctx.engine.record_rejected()
        raise


async def embed(request: web.Request) -> web.Response:
    ctx, body = await _body(request)
    try:
        texts = _texts(body.get("inputs"), "inputs")
        normalize = optional_bool(body, "normalize", default=True)
    except ApiError:
        ctx.engine.record_rejected()
        raise
    await _run(ctx, sum(input_tokens(t) for t in texts))
    dim, seed = ctx.config.embedding_dim, ctx.config.seed
    return web.json_response([embed_text(t, dim, seed, normalize=normalize) for t in texts])


async def root(request: web.Request) -> web.Response:
    """TEI's root route, what ``InferenceClient(base_url=...).feature_extraction`` posts to.

    A real TEI binds it to the one task of its model (embed, or rerank for a reranker); the simulator
    serves both, so the body's shape decides: a ``query`` asks for a rerank.
    """
    _, body = await _body(request)  # aiohttp keeps the body: the handler below reads it again
    return await (rerank(request) if "query" in body else embed(request))


def _query(body: dict[str, Any]) -> str:
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise ApiError(400, "`query` is required and must be a non-empty string", "validation")
    return query


async def rerank(request: web.Request) -> web.Response:
    ctx, body = await _body(request)
    try:
        query = _query(body)
        texts = _texts(body.get("texts"), "texts")
        raw_scores = optional_bool(body, "raw_scores")
        return_text = optional_bool(body, "return_text")
    except ApiError:
        ctx.engine.record_rejected()
        raise
    await _run(ctx, sum(input_tokens(query) + input_tokens(t) for t in texts))
    results: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        logit = rerank_logit(query, text, ctx.config.seed)
        item: dict[str, Any] = {"index": index, "score": logit if raw_scores else sigmoid(logit)}
        if return_text:
            item["text"] = text
        results.append(item)
    results.sort(key=lambda r: (-r["score"], r["index"]))
    return web.json_response(results)


def _top_n(body: dict[str, Any], count: int) -> int:
    top_n = body.get("top_n")
    if top_n is None:
        return count
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ApiError(400, "`top_n` must be a positive integer", "validation")
    return min(top_n, count)


async def openai_rerank(request: web.Request) -> web.Response:
    """``{model, query, documents, top_n?, return_documents?}`` → results by descending relevance."""
    ctx, body = await _body(request)
    try:
        query = _query(body)
        documents = _texts(body.get("documents"), "documents")
        top_n = _top_n(body, len(documents))
        return_documents = optional_bool(body, "return_documents", default=True)
    except ApiError:
        ctx.engine.record_rejected()
        raise
    tokens = sum(input_tokens(query) + input_tokens(d) for d in documents)
    await _run(ctx, tokens)
    seed = ctx.config.seed
    scored = [(sigmoid(rerank_logit(query, doc, seed)), index, doc) for index, doc in enumerate(documents)]
    scored.sort(key=lambda r: (-r[0], r[1]))
    results: list[dict[str, Any]] = []
    for score, index, doc in scored[:top_n]:
        item: dict[str, Any] = {"index": index, "relevance_score": score}
        if return_documents:
            item["document"] = {"text": doc}
        results.append(item)
    return web.json_response(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": ctx.config.model_id,
            "usage": {"total_tokens": tokens},
            "results": results,
        }
    )


def _encode_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def openai_embeddings(request: web.Request) -> web.Response:
    ctx, body = await _body(request)
    try:
        texts = _texts(body.get("input"), "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, "`encoding_format` must be 'float' or 'base64'", "validation")
    except ApiError:
        ctx.engine.record_rejected()
        raise
    tokens = sum(input_tokens(t) for t in texts)
    await _run(ctx, tokens)
    dim, seed = ctx.config.embedding_dim, ctx.config.seed
    data = []
    for index, text in enumerate(texts):
        vector = embed_text(text, dim, seed)
        data.append(
            {
                "object": "embedding",
                "embedding": _encode_base64(vector) if encoding == "base64" else vector,
                "index": index,
            }
        )
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": ctx.config.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def info(request: web.Request) -> web.Response:
    ctx = get_context(request)
    return web.json_response(
        {
            "model_id": ctx.config.model_id,
            "model_sha": None,
            "model_dtype": "float16",
            "model_type": {"embedding": {"pooling": "cls"}},
            "max_concurrent_requests": ctx.engine.knobs.latency.max_batch + ctx.engine.knobs.max_queue,
            "max_input_length": MAX_INPUT_LENGTH,
            "max_batch_tokens": 16384,
            "max_batch_requests": ctx.engine.knobs.latency.max_batch,
            "max_client_batch_size": MAX_CLIENT_BATCH_SIZE,
            "auto_truncate": True,
            "tokenization_workers": 4,
            "version": TEI_VERSION,
            "sha": None,
            "docker_label": None,
        }
    )
