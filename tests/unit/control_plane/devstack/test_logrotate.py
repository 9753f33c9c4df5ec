"""Access-log rotation: rename at the size limit, keep K files, ask Envoy to reopen (a real HTTP call)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from control_plane.devstack.logrotate import AccessLogRotator, RotationPolicy

pytestmark = pytest.mark.unit


@pytest.fixture
def admin() -> Iterator[tuple[str, list[str]]]:
    """A stand-in for Envoy's admin that records the calls it gets."""
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            calls.append(self.path)
            self.send_response(200)
            self.send_header("content-length", "3")
            self.end_headers()
            self.wfile.write(b"OK\n")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", calls
    server.shutdown()
    server.server_close()


def test_rotates_at_the_limit_keeps_k_files_and_reopens(tmp_path: Path, admin: tuple[str, list[str]]) -> None:
    url, calls = admin
    log = tmp_path / "access.log"
    rotator = AccessLogRotator(lambda: [(log, url)], RotationPolicy(max_bytes=10, keep=2), interval_s=0)
    assert rotator.check() == []  # no file yet
    log.write_text("short\n")
    assert rotator.check() == [] and calls == []  # under the limit
    for generation in range(4):
        log.write_text(f"generation {generation}\n")
        assert rotator.check() == [log]
    assert calls == ["/reopen_logs"] * 4
    assert not log.exists()
    assert (tmp_path / "access.log.1").read_text() == "generation 3\n"
    assert (tmp_path / "access.log.2").read_text() == "generation 2\n"
    assert not (tmp_path / "access.log.3").exists()


def test_an_unreachable_envoy_does_not_stop_rotation(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text("x" * 100)
    rotator = AccessLogRotator(
        lambda: [(log, "http://127.0.0.1:9")], RotationPolicy(max_bytes=10), interval_s=0
    )
    assert rotator.check() == [log]
    assert (tmp_path / "access.log.1").exists()


def test_checks_are_spaced(tmp_path: Path) -> None:
    now = [0.0]
    log = tmp_path / "access.log"
    rotator = AccessLogRotator(
        lambda: [(log, "http://127.0.0.1:9")], RotationPolicy(max_bytes=1), interval_s=5, clock=lambda: now[0]
    )
    assert rotator.check() == []
    log.write_text("x")
    now[0] = 1.0
    assert rotator.check() == []  # too soon
    now[0] = 5.0
    assert rotator.check() == [log]
