"""Gateway state → the RouteConfiguration that maps each model name to its cluster.

Route order is the contract (first match wins):
1. `CONNECT`: 405 (Envoy itself refuses it first, see local_reply.py; the route is a backstop).
2. `GET /v1/models`, `/v1/models/{name}`, `GET /health`: answered by Envoy itself (an unknown name:
   404 model_not_found); any other method on them: 405 with `allow: GET`.
3. a path outside the inference API allow-list: 404 (engines' admin paths are never exposed).
4. any method but POST on an inference path: 405 with `allow: POST`.
5. a body that is not JSON: 400; no model at all: 400.
6. one route per model name (id and aliases) matching the `model` metadata; a disabled model answers 503.
7. any other string `model`: 404; a `model` of another type: 400.
Envoy walks this list in order, twice per request (before and after the body sets the model), so what
can be decided without the model list comes first, and each method check is one route, not one per model.

The `model` metadata comes from the JSON body (json_to_metadata), else from a `/models/{model}/...` path,
else from the model header (header_to_metadata); see `listener.py`. The model routes strip that prefix.
"""

from __future__ import annotations

import json
import re
from functools import cache

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2

from control_plane.state import GatewayState, ModelState
from control_plane.xds.builders._common import seconds, uint32
from control_plane.xds.builders.fallback import apply_fallbacks
from control_plane.xds.builders.generate import GENERATE_PATH, rename_per_route, route_metadata
from control_plane.xds.builders.keys import KEY_ID_HEADER, key_route_metadata, skip_key_check
from control_plane.xds.builders.prefix_affinity import hash_policy, prefix_per_route
from control_plane.xds.builders.priority import apply_priority_routes
from control_plane.xds.builders.retry import retry_policy, route_idle_timeout_s
from control_plane.xds.builders.shedding import apply_shedding
from control_plane.xds.resources import METADATA_NAMESPACE, ROUTE_CONFIG_NAME, cluster_name, model_route_name

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

# TGI-native clients (`text_generation.Client`, `huggingface_hub.InferenceClient(base_url=...)`) post to
# their base URL itself and name no model: `/models/{model}` + an inference path (or `/`, TGI's root) names
# it in the path. The listener reads the name out of the path (MODEL_PATH_REGEX); the model's route strips
# the prefix again (`_strip_model_prefix`).
MODEL_PREFIX = "/models/"
# The inference paths without their leading `/`, as found after `/models/{model}/`.
_SUFFIXES = "|".join(re.escape(p[1:]) for p in INFERENCE_PATHS)
# The same, shorter (Envoy refuses a regex whose RE2 program is over 100): any `/v1/...` path.
_LOOSE_SUFFIXES = "|".join(["v1/[a-z_/]+", *(re.escape(p[1:]) for p in INFERENCE_PATHS if "/v1/" not in p)])
# Group 1: the model named by `/models/{model}[/<inference path>]`; group 2: by `/v1/models/{model}` (for
# the 404 of an unknown one). Any other path matches with both groups empty: no metadata is set.
MODEL_PATH_REGEX = (
    f"^(?:/models/([^?]+?)(?:/(?:{_LOOSE_SUFFIXES}))?/?|/v1/models/([^?]+)|[^?]*)(?:\\?.*)?$"
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


def _method_is(method: str, invert: bool = False) -> rc.HeaderMatcher:
    return rc.HeaderMatcher(
        name=":method", string_match=string_pb2.StringMatcher(exact=method), invert_match=invert
    )


def _get(path: str) -> rc.RouteMatch:
    return rc.RouteMatch(path=path, headers=[_method_is("GET")])


def _not_allowed(name: str, match: rc.RouteMatch, allow: str) -> rc.Route:
    """405 with the `allow` header RFC 9110 asks for; the JSON body comes from the local reply mapper."""
    route = _direct(name, match, 405, f"This path accepts only {allow} (see the `allow` header).")
    route.response_headers_to_add.append(
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="allow", value=allow),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )
    return route


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


@cache  # the same on every model route: built once, copied into each route
def _strip_model_prefix() -> regex_pb2.RegexMatchAndSubstitute:
    """`/models/{model}[/<inference path>]` → the engine's own path, `/` (TGI's root) when no inference
    path follows: whatever the path holds, an engine is sent an inference path or `/`, never its /metrics.
    Not tied to the route's name: a model name may be 200 characters, too long for Envoy's regex limit."""
    return regex_pb2.RegexMatchAndSubstitute(
        pattern=regex_pb2.RegexMatcher(regex=f"^{re.escape(MODEL_PREFIX)}[^?]+?(?:/({_SUFFIXES}))?/?$"),
        substitution="/\\1",
    )


def _model_route_metadata(model: ModelState, keys_checked: bool) -> base_pb2.Metadata:
    # Read by the generate filter: /v1/generate scenarios and served_model (generate.py); by the API-key
    # check: the model id (keys.py).
    metadata = route_metadata(model.config)
    if keys_checked:
        for name, value in key_route_metadata(model.id).items():
            metadata.filter_metadata[name].CopyFrom(value)
    return metadata


def _model_routes(model: ModelState, keys_checked: bool = False) -> list[rc.Route]:
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
                name=model_route_name(name),
                match=match,
                metadata=_model_route_metadata(model, keys_checked),
                # The rename filter (served_model) and the prefix-key filter (prefix_affinity): on this
                # route only if the model needs them.
                typed_per_filter_config={**rename_per_route(model.config), **prefix_per_route(model.config)},
                route=rc.RouteAction(
                    cluster=cluster_name(model.id),
                    timeout=seconds(limits.request_timeout_s),
                    # Each try is cut after `idle_timeout_s` of silence (per_try_idle_timeout) and retried
                    # elsewhere if nothing reached the client yet; this outer bound covers all tries.
                    idle_timeout=seconds(route_idle_timeout_s(model)),
                    retry_policy=retry_policy(model),
                    # prefix_affinity: the key the prefix filter wrote, hashed onto the cluster's ring.
                    hash_policy=hash_policy(model.config),
                    regex_rewrite=_strip_model_prefix(),
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
    routes: list[rc.Route] = [
        _not_allowed("connect", rc.RouteMatch(connect_matcher=rc.RouteMatch.ConnectMatcher()), "GET, POST"),
        _direct("models", _get("/v1/models"), 200, models_list_body(state)),
        # One method check for every read-only model path, ahead of the per-name routes below.
        _not_allowed(
            "models-method",
            rc.RouteMatch(path_separated_prefix="/v1/models", headers=[_method_is("GET", invert=True)]),
            "GET",
        ),
    ]
    for model in state.models:
        if model.enabled:
            body = json.dumps(_model_object(model), separators=(",", ":"))
            # Matched on the path alone: Envoy tests a route's header matchers before its path, so a
            # method check here would cost every request one check per model name.
            routes.extend(
                _direct(f"model-info:{n}", rc.RouteMatch(path=f"/v1/models/{n}"), 200, body)
                for n in model.config.names
            )
    # The model's name is in the metadata (listener.py reads it out of the path) for the error's message.
    routes.append(_direct("unknown-model-info", rc.RouteMatch(path_separated_prefix="/v1/models"), 404, ""))
    health = _direct("health", _get("/health"), 200, '{"status":"ok"}')
    if state.auth_mode == "api_key":
        # Load balancers' probes carry no key.
        for name, config in skip_key_check().items():
            health.typed_per_filter_config[name].CopyFrom(config)
    routes.append(health)
    routes.append(_not_allowed("health-method", rc.RouteMatch(path="/health"), "GET"))

    # An inference path, /v1/generate (its model is in the body's `model_id` alone); TGI's root `/`, or
    # anything after `/models/` (the model route keeps only an inference path of it, `_strip_model_prefix`).
    # Two regexes, each under Envoy's RE2 program size limit (100); a path is unknown if neither matches.
    allowed = (
        "|".join([re.escape(GENERATE_PATH), *(re.escape(p) for p in INFERENCE_PATHS)]),
        f"/|{re.escape(MODEL_PREFIX)}[^?]+",
    )
    routes.append(
        _direct(
            "unknown-path",
            rc.RouteMatch(
                prefix="/",
                headers=[
                    rc.HeaderMatcher(
                        name=":path",
                        string_match=string_pb2.StringMatcher(
                            safe_regex=regex_pb2.RegexMatcher(regex=f"^({paths})(\\?.*)?$")
                        ),
                        invert_match=True,
                    )
                    for paths in allowed
                ],
            ),
            404,
            "Unknown API path. The gateway serves: GET /v1/models, "
            + ", ".join(f"POST {p}" for p in INFERENCE_PATHS)
            + f", POST {GENERATE_PATH}"
            + ", POST / (TGI), and each of those after /models/{model}",
        )
    )
    # Only inference paths get this far: they take POST alone (a PUT, HEAD or OPTIONS never reaches an
    # engine).
    routes.append(
        _not_allowed(
            "inference-method", rc.RouteMatch(prefix="/", headers=[_method_is("POST", invert=True)]), "POST"
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
            f"You must provide a model parameter: `model` in the JSON body as a non-empty string (`model_id` "
            f"for /v1/generate, or the `{state.settings.model_header}` header).",
        )
    )
    for model in state.models:
        routes.extend(_model_routes(model, keys_checked=state.auth_mode == "api_key"))
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
    # Models that cannot serve now send their requests to a fallback model (fallback.py); saturated ones
    # shed by priority (shedding.py); high priority gets its own routes where a model reserves capacity
    # for it (priority.py).
    routes = apply_priority_routes(apply_shedding(apply_fallbacks(routes, state), state), state)
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
        # Envoy adds it for requests from outside (use_remote_address); the engines have no use for it.
        # Clients' own x-envoy-* headers are removed on arrival (listener.py).
        # ...and the key's id, set by the API-key check for the quota filter.
        request_headers_to_remove=["x-envoy-external-address", KEY_ID_HEADER],
        # Envoy refuses direct-response bodies over 4 KiB unless told otherwise; /v1/models outgrows that
        # at a few dozen models, and the whole route table would be rejected.
        max_direct_response_body_size_bytes=uint32(max(largest_body, 4096)),
    )
