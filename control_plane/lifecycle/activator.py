"""The activator: where Envoy sends the requests of a launched model that has no ready replica.

The Knative pattern: while a model is cold or loading, its only endpoint (EDS) is this server. A request
arriving here starts the model's load (one load however many requests arrive: lifecycle/manager.py), waits
for a ready replica at most the model's activation timeout, then is forwarded to it, its answer streamed
back as it comes (SSE included). Once the model is ready its endpoints are the replicas: later requests go
from Envoy straight to them, never through here. Requests wait in arrival order (asyncio wakes waiters in
the order they started waiting).

Envoy's route already did everything else (key check, body checks, served_model renaming, prefix
stripping): the request is forwarded as it arrived, but for hop-by-hop headers. The model is named by the
`x-gateway-model` header every model route adds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from control_plane.lifecycle.manager import LifecycleError, LifecycleManager

log = logging.getLogger(__name__)

MODEL_HEADER = "x-gateway-model"
ERROR_CODE_HEADER = "x-gateway-error-code"
_HOP_BY_HOP = frozenset(
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"]
)
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _error(status: int, code: str, message: str, retry_after: int | None = None) -> Response:
    headers = {ERROR_CODE_HEADER: code}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    else:
        headers["x-should-retry"] = "false"
    body = {"error": {"message": message, "type": "server_error", "code": code}}
    return Response(json.dumps(body), status, headers=headers, media_type="application/json")


def upstream_client() -> httpx.AsyncClient:
    # No overall timeout: an answer may stream for minutes. Connecting to a ready replica is quick.
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))


def create_activator_app(manager: LifecycleManager, upstream: httpx.AsyncClient) -> Starlette:
    """The activator's ASGI app; the caller owns `upstream` (closes it at shutdown)."""

    async def forward(request: Request) -> Response:
        model_id = request.headers.get(MODEL_HEADER, "")
        if not manager.knows(model_id):
            return _error(404, "model_not_found", f"The model `{model_id}` is not a launched model.")
        body = await request.body()
        try:
            host, port = await manager.acquire(model_id)
        except LifecycleError as exc:
            retry = 5 if exc.code == "model_loading_timeout" else None
            return _error(503, exc.code, str(exc), retry_after=retry)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        url = httpx.URL(f"http://{host}:{port}{request.url.path}", query=request.url.query.encode())
        try:
            answer = await upstream.send(
                upstream.build_request(request.method, url, headers=headers, content=body), stream=True
            )
        except httpx.HTTPError as exc:
            manager.release(model_id)
            return _error(502, "upstream_unavailable", f"The model `{model_id}` could not be reached: {exc}")

        async def relay() -> AsyncIterator[bytes]:
            async for chunk in answer.aiter_raw():
                yield chunk

        async def done() -> None:
            await answer.aclose()
            manager.release(model_id)

        out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
        out_headers.pop("content-length", None)  # streamed as it comes (chunked)
        return StreamingResponse(
            relay(), answer.status_code, headers=out_headers, background=BackgroundTask(done)
        )

    return Starlette(routes=[Route("/{path:path}", forward, methods=_METHODS)])
