"""The admin API's input edge against a real uvicorn: the token before the body, 1 MiB bodies, and a 4xx
with a `{"detail": ...}` for every bad input, fuzzed with a few thousand generated requests.

A real `ControlPlane` (no Envoy connected: changes are published to the cache, nobody ACKs) and the real
admin app with its ASGI gates, served by uvicorn on an ephemeral loopback port. The size and auth tests
speak raw HTTP/1.1 over a socket so they can stop sending a body half way.
"""

from __future__ import annotations

import json
import random
import socket
import string
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from pydantic import SecretStr

from control_plane.admin.app import create_admin_app
from control_plane.admin.body import MAX_BODY_BYTES, MAX_DEPTH
from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.store.overlay import AdminStore
from control_plane.xds.cache import SnapshotCache
from tests.support.asgi_server import serve_app

pytestmark = pytest.mark.unit

TOKEN = "input-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "content-type": "application/json"}


def _plane(tmp_db: str = ":memory:") -> tuple[ControlPlane, ControlPlaneMetrics]:
    registry = parse_registry(
        {
            "models": [
                {
                    "id": "qwen2",
                    "engine": "tgi",
                    "aliases": ["qwen"],
                    "endpoints": [
                        {"id": "qwen2-0", "url": "http://127.0.0.1:9101"},
                        {"id": "qwen2-1", "url": "http://127.0.0.1:9102"},
                    ],
                },
                {"id": "llama3", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:9201"}]},
            ]
        }
    )
    metrics = ControlPlaneMetrics.create()
    plane = ControlPlane(
        registry, cache=SnapshotCache(), metrics=metrics, store=AdminStore(tmp_db), resolver=lambda h: h
    )
    return plane, metrics


@pytest.fixture
def admin_url() -> Iterator[str]:
    plane, metrics = _plane()
    with serve_app(create_admin_app(plane, metrics, None, SecretStr(TOKEN))) as url:
        yield url


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def _read_response(sock: socket.socket, timeout_s: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, read off a raw socket."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _raw(url: str, head: str) -> socket.socket:
    sock = socket.create_connection(_address(url), timeout=10)
    sock.sendall(head.encode("latin-1"))
    return sock


# The token before the body


def test_an_unauthenticated_body_is_never_read(admin_url: str) -> None:
    # A 100 MB body is announced and not one byte of it is sent: the 401 must come anyway (from the
    # headers alone), and the connection closes (the unread body is not a next request).
    for extra in ("Content-Length: 100000000\r\n", "Transfer-Encoding: chunked\r\n"):
        with _raw(
            admin_url,
            f"POST /admin/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n",
        ) as sock:
            status, headers, body = _read_response(sock)
            assert status == 401, body
            assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
            assert "Authorization: Bearer" in json.loads(body)["detail"]
            assert sock.recv(1) == b""  # closed by the server


def test_wrong_tokens_are_refused_everywhere_but_the_open_paths(admin_url: str) -> None:
    with httpx.Client(base_url=admin_url, timeout=10) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            for method, path in (
                ("GET", "/admin/models"),
                ("POST", "/admin/endpoints/qwen2-0/drain"),
                ("POST", "/alerts/webhook"),
                ("GET", "/admin/nothing-here"),
            ):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401 and response.json()["detail"], (method, path)
        for path in ("/healthz", "/metrics", "/docs", "/openapi.json", "/docs/assets/swagger-ui.css"):
            assert client.get(path).status_code == 200, path
        # A non-ASCII header value (Latin-1 on the wire) is just a wrong token.
        assert (
            client.get("/admin/models", headers={"authorization": "Bearer tök".encode("latin-1")}).status_code
            == 401
        )


# Size


def test_a_declared_length_over_one_mib_is_refused_before_the_body(admin_url: str) -> None:
    with _raw(
        admin_url,
        f"POST /admin/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n",
    ) as sock:
        status, headers, body = _read_response(sock)
    assert status == 413 and str(MAX_BODY_BYTES) in json.loads(body)["detail"]
    assert headers["connection"] == "close"


def _chunked(sock: socket.socket, payload: bytes, piece: int = 64 * 1024) -> None:
    for start in range(0, len(payload), piece):
        chunk = payload[start : start + piece]
        sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")


def test_a_chunked_body_is_cut_as_it_passes_one_mib(admin_url: str) -> None:
    head = (
        f"POST /admin/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    # Just over the limit and never finished (no last chunk): the 413 cannot wait for the end.
    with _raw(admin_url, head) as sock:
        _chunked(sock, b" " * (MAX_BODY_BYTES + 1024))
        status, headers, body = _read_response(sock)
        assert status == 413 and headers["connection"] == "close", body
    # Exactly the limit, finished: read whole and applied (a model without endpoints is valid).
    document = json.dumps({"id": "x", "engine": "tgi"}).encode()
    with _raw(admin_url, head) as sock:
        _chunked(sock, document + b" " * (MAX_BODY_BYTES - len(document)))
        sock.sendall(b"0\r\n\r\n")
        status, _, body = _read_response(sock)
        assert status == 201 and json.loads(body)["id"] == "x", body


# Every bad input: a 4xx and a message

BAD_BODIES: list[tuple[str, bytes, str, int, str]] = [
    ("lone surrogate", b'{"id": "\\ud800", "engine": "tgi"}', "application/json", 400, "surrogate"),
    ("surrogate key", b'{"\\udfff": 1}', "application/json", 400, "surrogate"),
    ("latin-1 byte", b'{"id": "caf\xe9"}', "application/json", 400, "UTF-8"),
    ("lone continuation byte", b'{"id": "\x80"}', "application/json", 400, "UTF-8"),
    ("truncated JSON", b'{"id": "x", ', "application/json", 400, "not valid JSON"),
    ("not JSON", b"id=x&engine=tgi", "application/json", 400, "not valid JSON"),
    ("form content type", b"id=x&engine=tgi", "application/x-www-form-urlencoded", 415, "JSON"),
    ("text content type", b'{"id": "x"}', "text/plain", 415, "JSON"),
    ("no content type", b'{"id": "x"}', "", 415, "JSON"),
    ("deep nesting", b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "application/json", 400, "nests"),
    ("very deep nesting", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "application/json", 400, "nests"),
    ("huge integer", b'{"weight": ' + b"9" * 5000 + b"}", "application/json", 400, "digits"),
    ("infinite float", b'{"weight": 1e999}', "application/json", 400, "out of range"),
    ("NaN", b'{"weight": NaN}', "application/json", 400, "not a JSON value"),
    ("wrong type", b'{"id": 5, "engine": "tgi", "endpoints": []}', "application/json", 422, "id"),
    ("array body", b"[1, 2]", "application/json", 422, ""),
    ("null body", b"null", "application/json", 422, ""),
    ("unknown engine", b'{"id": "x", "engine": "gpt", "endpoints": []}', "application/json", 422, ""),
    ("unknown key", b'{"id": "x", "engine": "tgi", "evil": 1}', "application/json", 422, "evil"),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [pytest.param(b, c, s, w, id=name) for name, b, c, s, w in BAD_BODIES],
)
def test_bad_bodies_get_a_4xx_with_a_message(
    admin_url: str, body: bytes, content_type: str, status: int, says: str
) -> None:
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    with httpx.Client(base_url=admin_url, timeout=10) as client:
        for path in ("/admin/models", "/admin/models/qwen2/endpoints", "/alerts/webhook"):
            response = client.post(path, content=body, headers=headers)
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
            detail = response.json()["detail"]
            assert detail
            if path == "/admin/models":
                assert response.status_code == status, response.text
                assert says in json.dumps(detail), detail
        # The connection and the app are still fine afterwards.
        assert client.get("/admin/models", headers=AUTH).status_code == 200


def test_auto_drain_of_an_unknown_alert_is_refused(admin_url: str) -> None:
    with httpx.Client(base_url=admin_url, headers=AUTH, timeout=10) as client:
        refused = client.put("/admin/alerts/EndpointDwn/auto-drain", json={"enabled": True})
        assert refused.status_code == 422 and "EndpointDown" in refused.json()["detail"]
        assert "EndpointDwn" not in client.get("/admin/alerts").json()["auto_drain"]
        accepted = client.put("/admin/alerts/EndpointDown/auto-drain", json={"enabled": True})
        assert accepted.status_code == 200 and accepted.json()["auto_drain"] is True


# Fuzzing

SEGMENTS = [
    "qwen2",
    "qwen",
    "llama3",
    "qwen2-0",
    "nope",
    "",
    "..",
    "%2e%2e",
    "%00",
    "%ff%fe",
    "%ed%a0%80",  # a UTF-8-encoded surrogate
    "%0a",
    "a%0d%0ab",
    "%20",
    "é",
    "💥",
    "x" * 300,
    "drain",
    "endpoints",
    "enable",
    "?limit=-5",
    "?limit=99999999999999999999999",
    "?limit=abc",
    "?window_s=-1",
    ";",
    "%",
]
NAMES = ["qwen2", "qwen", "llama3", "qwen2-0", "qwen2-1", "llama3-0", "EndpointDown", "HighErrorRate"]
# Each path with the method it takes (the fuzzer sends another one now and then).
PATHS = [
    ("/admin/models", "POST"),
    ("/admin/models", "GET"),
    ("/admin/models/{}", "GET"),
    ("/admin/models/{}", "DELETE"),
    ("/admin/models/{}/endpoints", "POST"),
    ("/admin/models/{}/enable", "POST"),
    ("/admin/models/{}/disable", "POST"),
    ("/admin/models/{}/drain", "POST"),
    ("/admin/models/{}/undrain", "POST"),
    ("/admin/endpoints/{}", "GET"),
    ("/admin/endpoints/{}/drain", "POST"),
    ("/admin/endpoints/{}/undrain", "POST"),
    ("/admin/alerts/{}/auto-drain", "PUT"),
    ("/admin/audit{}", "GET"),
    ("/admin/alerts{}", "GET"),
    ("/admin/status{}", "GET"),
    ("/alerts/webhook", "POST"),
    ("/{}", "GET"),
    ("/admin/{}/{}", "POST"),
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


def _random_text(rng: random.Random) -> str:
    pools = [
        string.printable,
        "\x00\x01\x1f\x7f\n\r\t",
        "éü中文💥\u202e\ufeff\uffff",
        "\ud800\udc00\udbff",  # surrogates (lone ones when not paired up)
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 24)))


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randint(0, 9 if depth < 6 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**31, 2**64, rng.randint(-(10**30), 10**30), 10**60])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-320, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return _random_text(rng)
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["id", "engine", "url", "weight", "endpoints", "aliases", "enabled", "alerts", "status", "labels"]
    return {
        rng.choice([*keys, _random_text(rng)]): _random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 5))
    }


def _plausible(rng: random.Random) -> dict[str, Any]:
    """Close to a valid model, endpoint, notification or setting, with one part wrong (or none)."""
    documents: list[dict[str, Any]] = [
        {
            "id": f"m{rng.randint(0, 10**6)}",
            "engine": rng.choice(["tgi", "vllm", "sglang", "tei"]),
            "endpoints": [{"url": f"http://127.0.0.1:{rng.randint(1, 65535)}"}],
        },
        {"url": f"http://127.0.0.1:{rng.randint(1, 65535)}", "weight": rng.randint(1, 10)},
        {"enabled": rng.choice([True, False])},
        {
            "status": "firing",
            "alerts": [{"status": "firing", "labels": {"alertname": "EndpointDown", "endpoint": "nope"}}],
        },
    ]
    document = rng.choice(documents)
    if rng.random() < 0.6:
        document[rng.choice([*document, _random_text(rng)])] = _random_value(rng)
    return document


def _json_bytes(value: Any, rng: random.Random) -> bytes:
    # ensure_ascii writes lone surrogates as \ud800 escapes, as a hostile client would.
    text = json.dumps(value, ensure_ascii=rng.random() < 0.7)
    return text.encode("utf-8", errors="surrogatepass")


BODY_MAKERS: list[Callable[[random.Random], bytes]] = [
    lambda rng: _json_bytes(_plausible(rng), rng),
    lambda rng: _json_bytes(_random_value(rng), rng),
    lambda rng: rng.randbytes(rng.randint(1, 200)),
    lambda rng: _json_bytes(_plausible(rng), rng)[: rng.randint(0, 40)],
    lambda rng: b"[" * rng.randint(30, 3000) + b"]" * rng.randint(0, 3000),
    lambda rng: b'{"weight": ' + b"9" * rng.randint(20, 6000) + b"}",
    lambda rng: b'{"id": "\\u' + rng.choice([b"d800", b"dbff", b"dc00", b"0000", b"zzzz"]) + b'"}',
    lambda rng: _json_bytes(_plausible(rng), rng).replace(b'"', rng.choice([b"'", b'"\xff', b'"\xc3']), 1),
]
CONTENT_TYPES = [
    "application/json",
    "application/json",
    "application/json; charset=utf-8",
    "application/merge-patch+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=latin-1",
    "",
]


def _segment(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(NAMES)
    if roll < 0.8:
        return rng.choice(SEGMENTS)
    return quote(_random_text(rng).encode("utf-8", errors="surrogatepass"), safe="")


def _request(rng: random.Random) -> tuple[str, str, bytes | None, dict[str, str]]:
    template, method = rng.choice(PATHS)
    path = template.replace("{}", _segment(rng), 1).replace("{}", _segment(rng), 1)
    if rng.random() < 0.1:
        method = rng.choice(METHODS)
    headers = dict(AUTH) if rng.random() < 0.95 else {"authorization": rng.choice(["", "Bearer", "Basic x"])}
    body: bytes | None = None
    if method in ("POST", "PUT", "PATCH") and rng.random() < 0.9:
        body = (BODY_MAKERS[0] if rng.random() < 0.4 else rng.choice(BODY_MAKERS))(rng)
        content_type = rng.choice(CONTENT_TYPES) if rng.random() < 0.3 else "application/json"
        if content_type:
            headers["content-type"] = content_type
    return method, path, body, headers


def test_fuzzed_requests_never_get_a_5xx_or_a_dropped_connection(admin_url: str) -> None:
    rng = random.Random(20261129)
    statuses: dict[int, int] = {}
    started = time.monotonic()
    with httpx.Client(base_url=admin_url, timeout=15) as client:
        for number in range(5000):
            method, path, body, headers = _request(rng)
            try:
                response = client.request(method, path, content=body, headers=headers)
            except httpx.HTTPError as exc:
                pytest.fail(f"request {number}: {method} {path} {body!r:.200}: {type(exc).__name__}: {exc}")
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            sent = f"request {number}: {method} {path} {body!r:.200}"
            context = f"{sent} → {response.status_code} {response.text:.300}"
            assert response.status_code < 500, context
            if response.status_code >= 400 and method != "HEAD":
                assert response.json().get("detail"), context
        assert client.get("/admin/models", headers=AUTH).status_code == 200
    # The fuzzing reached past the gates, not only into them.
    assert statuses.get(200, 0) + statuses.get(201, 0) > 50, statuses
    assert statuses.get(422, 0) > 50 and statuses.get(400, 0) > 50 and statuses.get(404, 0) > 50, statuses
    print(
        f"{sum(statuses.values())} requests in {time.monotonic() - started:.1f} s: {sorted(statuses.items())}"
    )
