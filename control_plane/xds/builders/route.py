"""Gateway state → the RouteConfiguration that maps each model name to its cluster.

Route order is the contract (first match wins):
1. `GET /v1/models`, `/v1/models/{name}`, `GET /health`: answered by Envoy itself.
2. a path outside the inference API allow-list: 404 (engines' admin paths are never exposed).
3. a body that is not JSON: 400; no model at all: 400.
4. one route per model name (id and aliases) matching the `model` metadata; a disabled model answers 503.
5. any other string `model`: 404; a `model` of another type: 400.
Envoy walks this list in order, twice per request (before and after the body sets the model), so what
can be decided without the model list comes first.

The `model` metadata comes from the JSON body (json_to_metadata), else from the model header
(header_to_metadata); the body wins when both are given, see `listener.py`.
"""

from __future__ import annotations

import json
import re

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2

from control_plane.state import GatewayState, ModelState
from control_plane.xds.builders._common import seconds, uint32
from control_plane.xds.resources import METADATA_NAMESPACE, ROUTE_CONFIG_NAME, cluster_name

# Paths of the inference APIs the gateway forwards (OpenAI, TGI native, TEI). Anything else, such as an
# engine's /metrics or weight-update endpoints, is not reachable through the gateway.
INFERENCE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/score",
    "/generate",
    "/generate_stream",
    "/embed",
    "/rerank",
)

MODEL_KEY = "model"
BODY_INVALID_KEY = "body_invalid"
MODEL_MISSING_KEY = "model_missing"


def _metadata_match(key: str, value: value_pb2.ValueMatcher) -> metadata_pb2.MetadataMatcher:
    return metadata_pb2.MetadataMatcher(
        filter=METADATA_NAMESPACE,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=key)],
        value=value,
    )


def _model_is(name: str) -> metadata_pb2.MetadataMatcher:
    return _metadata_match(
        MODEL_KEY, value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=name))
    )


def _direct(name: str, match: rc.RouteMatch, status: int, body: str) -> rc.Route:
    return rc.Route(
        name=name,
        match=match,
        direct_response=rc.DirectResponseAction(status=status, body=base_pb2.DataSource(inline_string=body)),
    )


def _get(path: str) -> rc.RouteMatch:
    return rc.RouteMatch(
        path=path,
        headers=[rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact="GET"))],
    )


def _model_object(model: ModelState) -> dict[str, object]:
    return {
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": model.config.owned_by,
        "aliases": list(model.config.aliases),
    }


def models_list_body(state: GatewayState) -> str:
    data = [_model_object(m) for m in state.models if m.enabled]
    return json.dumps({"object": "list", "data": data}, separators=(",", ":"))


def _retry_policy(model: ModelState) -> rc.RetryPolicy:
    previous_hosts = any_pb2.Any()
    previous_hosts.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    return rc.RetryPolicy(
        # Envoy never retries once a response byte went downstream, so each of these is safe for a
        # generation: the client sees one answer, at worst the backend did some work twice.
        retry_on="connect-failure,refused-stream,reset,retriable-status-codes",
        retriable_status_codes=[503],
        num_retries=uint32(model.config.retry.attempts),
        retry_host_predicate=[
            rc.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts", typed_config=previous_hosts
            )
        ],
        host_selection_retry_max_attempts=3,
        # A replica that accepted the request and went silent is given up for another one (before any
        # byte reached the client); the route's idle timeout still bounds the whole exchange.
        per_try_idle_timeout=seconds(model.config.limits.idle_timeout_s),
        retry_back_off=rc.RetryPolicy.RetryBackOff(base_interval=seconds(0.025), max_interval=seconds(0.25)),
    )


def _model_routes(model: ModelState) -> list[rc.Route]:
    routes = []
    for name in model.config.names:
        match = rc.RouteMatch(prefix="/", dynamic_metadata=[_model_is(name)])
        if not model.enabled:
            routes.append(_direct(f"disabled:{name}", match, 503, f"The model `{model.id}` is disabled."))
            continue
        if model.draining:
            routes.append(_direct(f"draining:{name}", match, 503, f"The model `{model.id}` is draining."))
            continue
        limits = model.config.limits
        routes.append(
            rc.Route(
                name=f"model:{name}",
                match=match,
                route=rc.RouteAction(
                    cluster=cluster_name(model.id),
                    timeout=seconds(limits.request_timeout_s),
                    # Each try is cut after `idle_timeout_s` of silence (per_try_idle_timeout) and retried
                    # elsewhere if nothing reached the client yet; this outer bound covers all tries.
                    idle_timeout=seconds(limits.idle_timeout_s * (model.config.retry.attempts + 1) + 1),
                    retry_policy=_retry_policy(model),
                ),
                request_headers_to_add=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key="x-gateway-model", value=model.id),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
            )
        )
    return routes


def _response_headers(state: GatewayState) -> list[base_pb2.HeaderValueOption]:
    if not state.settings.expose_upstream_host:
        return []
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, value=value),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for key, value in (
            ("x-served-by", "%UPSTREAM_HOST%"),
            ("x-served-by-endpoint", "%UPSTREAM_HOST_NAME%"),
        )
    ]


def build_route_configuration(state: GatewayState) -> route_pb2.RouteConfiguration:
    routes: list[rc.Route] = [_direct("models", _get("/v1/models"), 200, models_list_body(state))]
    for model in state.models:
        if model.enabled:
            body = json.dumps(_model_object(model), separators=(",", ":"))
            # Matched on the path alone: Envoy tests a route's header matchers before its path, so a
            # method check here would cost every request one check per model name.
            routes.extend(
                _direct(f"model-info:{n}", rc.RouteMatch(path=f"/v1/models/{n}"), 200, body)
                for n in model.config.names
            )
    routes.append(_direct("health", _get("/health"), 200, '{"status":"ok"}'))

    allowed = "|".join(re.escape(p) for p in INFERENCE_PATHS)
    routes.append(
        _direct(
            "unknown-path",
            rc.RouteMatch(
                prefix="/",
                headers=[
                    rc.HeaderMatcher(
                        name=":path",
                        string_match=string_pb2.StringMatcher(
                            safe_regex=regex_pb2.RegexMatcher(regex=f"^({allowed})(\\?.*)?$")
                        ),
                        invert_match=True,
                    )
                ],
            ),
            404,
            "Unknown API path. The gateway serves: GET /v1/models, "
            + ", ".join(f"POST {p}" for p in INFERENCE_PATHS),
        )
    )
    routes.append(
        _direct(
            "invalid-json",
            rc.RouteMatch(
                prefix="/",
                dynamic_metadata=[
                    _metadata_match(BODY_INVALID_KEY, value_pb2.ValueMatcher(present_match=True))
                ],
            ),
            400,
            "We could not parse the JSON body of your request: send a JSON object with content-type "
            "application/json.",
        )
    )
    # Before the model routes, so a request without a model does not walk through all of them.
    routes.append(
        _direct(
            "missing-model",
            rc.RouteMatch(
                prefix="/",
                dynamic_metadata=[
                    metadata_pb2.MetadataMatcher(
                        filter=METADATA_NAMESPACE,
                        path=[metadata_pb2.MetadataMatcher.PathSegment(key=MODEL_KEY)],
                        value=value_pb2.ValueMatcher(present_match=True),
                        invert=True,
                    )
                ],
            ),
            400,
            f"You must provide a model parameter: `model` in the JSON body as a non-empty string (or the "
            f"`{state.settings.model_header}` header).",
        )
    )
    for model in state.models:
        routes.extend(_model_routes(model))
    any_string = value_pb2.ValueMatcher(
        string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"))
    )
    # The 404 body names the model; the listener's local reply mapper fills it in from the metadata.
    routes.append(
        _direct(
            "unknown-model",
            rc.RouteMatch(prefix="/", dynamic_metadata=[_metadata_match(MODEL_KEY, any_string)]),
            404,
            "",
        )
    )
    routes.append(
        _direct(
            "invalid-model",
            rc.RouteMatch(
                prefix="/",
                dynamic_metadata=[_metadata_match(MODEL_KEY, value_pb2.ValueMatcher(present_match=True))],
            ),
            400,
            "`model` must be a non-empty string.",
        )
    )
    vhost = rc.VirtualHost(
        name="gateway",
        domains=["*"],
        routes=routes,
        response_headers_to_add=_response_headers(state),
    )
    largest_body = max(
        len(r.direct_response.body.inline_string.encode()) for r in routes if r.HasField("direct_response")
    )
    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[vhost],
        # Envoy refuses direct-response bodies over 4 KiB unless told otherwise; /v1/models outgrows that
        # at a few dozen models, and the whole route table would be rejected.
        max_direct_response_body_size_bytes=uint32(max(largest_body, 4096)),
    )
