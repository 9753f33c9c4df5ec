"""The fastest upstream this repository can offer from Python: a bare asyncio ``Protocol`` HTTP/1.1 server.

It answers every POST with the same small OpenAI-shaped chat completion, and the control plane's health
probes (``GET /health``, ``GET /v1/models``, ``GET /info``) as a vLLM or TGI server would, so the full
gateway keeps it in rotation. Keep-alive, ``Content-Length`` bodies, no chunked requests, no pipelining
beyond what arrives in order. Used by the gateway-overhead benchmark as the one backend that every
variant (direct, bare Envoy, full gateway) calls: the less it costs per request, the more of the measured
difference is Envoy's.

    python -m loadtest.bench_upstream --port 0 [--model bench]     # prints "READY http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence


def _response(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )


def responses(model: str) -> dict[bytes, bytes]:
    """The canned answers by method and path (``b"POST"`` answers every POST)."""
    completion = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
        },
        separators=(",", ":"),
    ).encode()
    return {
        b"POST": _response("200 OK", completion),
        b"GET /health": _response("200 OK", b"{}"),
        b"GET /v1/models": _response(
            "200 OK", json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()
        ),
        b"GET /info": _response("200 OK", json.dumps({"model_id": model}).encode()),
        # No engine metrics: an empty exposition keeps the control plane's telemetry scraper quiet.
        b"GET /metrics": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n",
    }


_NOT_FOUND = _response("404 Not Found", b'{"error":"not found"}')


class _Http(asyncio.Protocol):
    def __init__(self, canned: dict[bytes, bytes]) -> None:
        self._canned = canned
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        out = []
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self._buffer[:end]
            length = 0
            lowered = head.lower()
            at = lowered.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lowered.find(b"\r\n", at + 2)
                length = int(lowered[at + 17 : stop if stop >= 0 else len(lowered)].strip())
            if len(self._buffer) < end + 4 + length:
                break  # the body is not all here yet
            self._buffer = self._buffer[end + 4 + length :]
            request_line = head.split(b"\r\n", 1)[0]
            method, _, rest = request_line.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method == b"POST":
                out.append(self._canned[b"POST"])
            else:
                out.append(self._canned.get(method + b" " + path, _NOT_FOUND))
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


async def serve(host: str, port: int, model: str) -> None:
    loop = asyncio.get_running_loop()
    canned = responses(model)
    server = await loop.create_server(lambda: _Http(canned), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_upstream", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (see the READY line)")
    p.add_argument("--model", default="bench", help="the model id it reports to health probes")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
