"""The control plane's in-process HTTP servers (admin API, activator): uvicorn on a socket bound up front,
so a port 0 is known before the server runs."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the control plane's handlers stop every server together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def embedded_server(app: Any) -> EmbeddedServer:
    """Quiet (warnings only, no access log), no lifespan events: the control plane starts and stops what
    the app needs itself."""
    return EmbeddedServer(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets, and without it every
    # response (headers and body sent apart) waits for the client's delayed ACK, about 40 ms.
    sock = socket.socket(
        socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock
