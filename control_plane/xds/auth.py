"""Who may talk xDS: every ADS and LRS stream must present its node's credential before it gets anything.

The credential is a bearer token in the stream's gRPC metadata (`authorization: Bearer <token>`), which
Envoy sends from its bootstrap (`grpc_services[].initial_metadata`). Each node has its own token, derived
from one deployment secret and the node id:

    token = "xds1." + base64url(HMAC-SHA256(secret, "llm-gateway/xds-node/" + node_id))

so the control plane stores one secret (never a list of tokens, never logged), a token is bound to its node
id (a node's bootstrap cannot be used to connect as another node, whose snapshot may differ), and a token
is checked by recomputing it and comparing digests in constant time.

A stream is judged before any resource is sent: no or malformed metadata is refused at once with
UNAUTHENTICATED; otherwise the first request (which names the node) is awaited for a bounded time and a
token that is not that node's is refused with PERMISSION_DENIED. Each refusal is counted
(`llm_gateway_xds_auth_failures_total{service, reason}`) and logged with the peer and node id, never the
presented or expected token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter
from pydantic import SecretStr

log = logging.getLogger(__name__)

TOKEN_PREFIX = "xds1."
_CONTEXT = b"llm-gateway/xds-node/"
# The access-log stream's credential is one for the whole deployment: Envoy takes it from its listener,
# which the control plane renders, and a per-node one would give every Envoy its own snapshot. It only
# lets a caller add to error counters; the node-bound tokens guard the config and the load reports.
_LOG_CONTEXT = b"llm-gateway/access-log"
# A client that opens a stream and never says who it is must not hold it open for ever.
FIRST_REQUEST_TIMEOUT_S = 10.0
MIN_SECRET_LENGTH = 16
REASONS = ("missing", "malformed", "no_node", "timeout", "wrong_token")

_Request = TypeVar("_Request")


def node_token(secret: str | SecretStr, node_id: str) -> str:
    """The credential of `node_id` under `secret`: what goes into that node's Envoy bootstrap."""
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    digest = hmac.new(key.encode("utf-8"), _CONTEXT + node_id.encode("utf-8"), hashlib.sha256).digest()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def log_token(secret: str | SecretStr) -> str:
    """The access-log stream's credential under `secret` (the same for every node)."""
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    digest = hmac.new(key.encode("utf-8"), _LOG_CONTEXT, hashlib.sha256).digest()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_secret(secret: str) -> str:
    """The secret, stripped; ValueError when it is too short to be one."""
    secret = secret.strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"the xDS secret must be at least {MIN_SECRET_LENGTH} characters")
    return secret


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _safe(text: str, limit: int = 80) -> str:
    """A node id for a log line: bounded, control characters escaped."""
    return repr(text[:limit])


class XdsAuthenticator:
    """Admits an xDS stream (ADS or LRS) only with the token of the node its first request names."""

    def __init__(
        self,
        secret: SecretStr,
        registry: CollectorRegistry | None = None,
        *,
        first_request_timeout_s: float = FIRST_REQUEST_TIMEOUT_S,
    ) -> None:
        self._secret = SecretStr(check_secret(secret.get_secret_value()))
        self._timeout_s = first_request_timeout_s
        self.failures = Counter(
            "llm_gateway_xds_auth_failures",
            "xDS streams (ADS, LRS, ALS) refused for a missing or wrong node credential.",
            ["service", "reason"],
            registry=registry,
        )
        for service in ("ads", "lrs", "als", "rlqs"):
            for reason in REASONS:
                self.failures.labels(service, reason)

    def token_for(self, node_id: str) -> str:
        return node_token(self._secret, node_id)

    def log_token(self) -> str:
        return log_token(self._secret)

    async def admit(
        self,
        service: str,
        requests: AsyncIterator[_Request],
        context: grpc.aio.ServicerContext,
        *,
        node_bound: bool = True,
        node_of: Callable[[_Request], str] | None = None,
    ) -> AsyncIterator[_Request]:
        """The stream's requests, first one included, once the caller is known; otherwise abort the call
        (context.abort raises) before anything is sent. `node_bound=False`: the deployment-wide access-log
        credential instead of the node's own. `node_of`: where a request names its node, for streams whose
        requests have no `node` field (ALS carries it in its identifier; RLQS not at all)."""
        peer = context.peer()
        # The first request is read before any verdict: a refusal sent while the client is still writing
        # it reaches the client as its own write failure (INTERNAL), not as the server's status.
        try:
            first = await asyncio.wait_for(anext(requests), timeout=self._timeout_s)
        except StopAsyncIteration:
            await self._refuse(context, service, "no_node", peer, "", grpc.StatusCode.UNAUTHENTICATED)
            raise
        except TimeoutError:
            await self._refuse(context, service, "timeout", peer, "", grpc.StatusCode.UNAUTHENTICATED)
            raise
        header = _bearer(context)
        if header is None:
            await self._refuse(context, service, "missing", peer, "", grpc.StatusCode.UNAUTHENTICATED)
        assert header is not None
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented.startswith(TOKEN_PREFIX):
            await self._refuse(context, service, "malformed", peer, "", grpc.StatusCode.UNAUTHENTICATED)
        node_id = node_of(first) if node_of else getattr(getattr(first, "node", None), "id", "") or ""
        if not node_id:
            await self._refuse(context, service, "no_node", peer, "", grpc.StatusCode.UNAUTHENTICATED)
        expected = (self.token_for(node_id) if node_bound else self.log_token()).encode("ascii")
        if not hmac.compare_digest(expected, presented.encode("utf-8", "replace")):
            await self._refuse(
                context, service, "wrong_token", peer, node_id, grpc.StatusCode.PERMISSION_DENIED
            )
        return _chain(first, requests)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        service: str,
        reason: str,
        peer: str,
        node_id: str,
        code: grpc.StatusCode,
    ) -> None:
        self.failures.labels(service, reason).inc()
        log.warning(
            "refused %s stream from %s (node %s): %s credential",
            service.upper(),
            peer,
            _safe(node_id) if node_id else "unknown",
            reason.replace("_", " "),
        )
        await context.abort(code, f"xDS credential refused ({reason.replace('_', ' ')})")


async def _chain(first: _Request, rest: AsyncIterator[_Request]) -> AsyncIterator[_Request]:
    yield first
    async for request in rest:
        yield request
