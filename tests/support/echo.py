"""A model server that answers every request with the method, path and headers it received, so tests
can see exactly what Envoy forwards. It passes the gateway's health probes as a vLLM server of `model_id`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class EchoServer:
    def __init__(self, model_id: str, port: int) -> None:
        self.model_id = model_id
        self.port = port
        self.requests: list[dict[str, Any]] = []  # requests seen, but health probes and metric scrapes
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="echo", daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        echo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path in ("/health", "/metrics"):  # the control plane's probes and scrapes
                    body: dict[str, Any] = {}
                elif self.path == "/v1/models" and self.command == "GET":
                    body = {"object": "list", "data": [{"id": echo.model_id, "object": "model"}]}
                else:
                    seen = {"method": self.command, "path": self.path, "headers": dict(self.headers.items())}
                    with echo._lock:
                        echo.requests.append(seen)
                    body = seen
                data = b"" if self.path == "/metrics" else json.dumps(body).encode()
                self.send_response(200)
                self.send_header(
                    "content-type", "text/plain" if self.path == "/metrics" else "application/json"
                )
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = _answer

        return Handler

    def forwarded(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.requests)

    @contextmanager
    def running(self) -> Iterator[EchoServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
