"""Gateway settings → the Listener with its HTTP connection manager and filter chain.

Before any filter (early header mutation): every `x-envoy-*` header a client sent is dropped (they steer
Envoy and must never reach an engine), and a client's `x-request-id` is kept only when it is at most 128
characters of letters, digits and `._:-`; otherwise it is dropped and Envoy makes a fresh one.

Filter chain on the request path (all request-side, so SSE answers stream through untouched):
1. header_to_metadata: the model header (`x-model-id`) → metadata `gateway.model`; a model named in the
   path (`/models/{model}/...`, `/v1/models/{model}`, see route.py) overwrites it.
2. buffer: holds the body up to `max_request_body_bytes` (413 above it).
3. json_to_metadata: the body's top-level `model` (or `model_id`, /v1/generate's name for it) →
   `gateway.model`, overwriting the header's value:
   the body wins when both are given, so a header can never send a body's request to another model.
   A body that is not JSON, or not sent as `application/json`, sets `gateway.body_invalid`.
3a. with API keys on: lua (key check, its table over ECDS: keys.py), lua (the keys' live state over its
   own ECDS stream: remaining-limit headers, the concurrency refusal: live.py), rate_limit_quota (the
   per-key request limit, RLQS to the control plane: quota.py).
3b. lua (shedding): low (then default) priority refused with 503 model_overloaded; entered only on the
   routes of saturated models (shedding.py). With keys on, after the key check and its quota filters.
4. lua (generate): /v1/generate ⇄ chat completions; skipped by a matcher on any other path.
5. lua (rename): served_model into `model`; entered only on the routes of models that set it.
   lua (prefix affinity): the prompt prefix's key into a header the route hashes; entered only on the
   routes of models with `load_balancing: prefix_affinity` (prefix_affinity.py).
5a. with API keys on: ai_protocol_manager (the engine's token usage into metadata: usage.py).
6. router (suppress_envoy_headers: no x-envoy-* request or response headers of its own).

Timeouts of the client side: request_headers_timeout for the headers, request_timeout for the whole
request; Envoy disarms the latter once the request is fully received (the buffer filter holds it until
then), so it never cuts a generation, however long it streams. Both answer 408.
"""

from __future__ import annotations

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2 as mutation
from envoy.config.core.v3 import address_pb2, base_pb2, extension_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2 as h2m
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2 as j2m
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, message, struct_pb2, wrappers_pb2

from control_plane.config.schema import GatewaySettings
from control_plane.state import NodeParams
from control_plane.xds.builders._common import ads_source, seconds, uint32
from control_plane.xds.builders.access_log import access_log_options, build_access_logs
from control_plane.xds.builders.generate import (
    LUA_FILTER_NAME,
    RENAME_FILTER_NAME,
    build_generate_filter,
    build_rename_filter,
)
from control_plane.xds.builders.keys import build_key_filter
from control_plane.xds.builders.live import build_live_filter
from control_plane.xds.builders.local_reply import build_local_reply_config
from control_plane.xds.builders.prefix_affinity import PREFIX_FILTER_NAME, build_prefix_filter
from control_plane.xds.builders.quota import build_quota_filter
from control_plane.xds.builders.route import BODY_INVALID_KEY, MODEL_KEY, MODEL_MISSING_KEY, MODEL_PATH_REGEX
from control_plane.xds.builders.shedding import build_shedding_filter
from control_plane.xds.builders.usage import MAX_TOKENS_KEY, build_usage_filter
from control_plane.xds.resources import LISTENER_NAME, METADATA_NAMESPACE, ROUTE_CONFIG_NAME


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _http_filter(name: str, config: message.Message) -> hcm.HttpFilter:
    return hcm.HttpFilter(name=name, typed_config=_packed(config))


def _model_header_filter(settings: GatewaySettings) -> h2m.Config:
    return h2m.Config(
        request_rules=[
            h2m.Config.Rule(
                header=settings.model_header,
                on_header_present=h2m.Config.KeyValuePair(
                    metadata_namespace=METADATA_NAMESPACE, key=MODEL_KEY, type=h2m.Config.STRING
                ),
            ),
            # After the header, so the path wins. A path naming no model rewrites to "", which sets nothing.
            h2m.Config.Rule(
                header=":path",
                on_header_present=h2m.Config.KeyValuePair(
                    metadata_namespace=METADATA_NAMESPACE,
                    key=MODEL_KEY,
                    type=h2m.Config.STRING,
                    regex_value_rewrite=regex_pb2.RegexMatchAndSubstitute(
                        pattern=regex_pb2.RegexMatcher(regex=MODEL_PATH_REGEX), substitution="\\1\\2"
                    ),
                ),
            ),
        ]
    )


def _max_tokens_rules() -> list[j2m.JsonToMetadata.Rule]:
    """The most a request may generate (`max_tokens`, or `max_completion_tokens` which wins), charged to
    its key when the engine reports no usage (a stream whose client did not ask for it)."""
    return [
        j2m.JsonToMetadata.Rule(
            selectors=[j2m.JsonToMetadata.Selector(key=name)],
            on_present=j2m.JsonToMetadata.KeyValuePair(
                metadata_namespace=METADATA_NAMESPACE, key=MAX_TOKENS_KEY, type=j2m.JsonToMetadata.NUMBER
            ),
        )
        for name in ("max_tokens", "max_completion_tokens")
    ]


def _json_body_filter(auth_mode: str = "none") -> j2m.JsonToMetadata:
    kv = j2m.JsonToMetadata.KeyValuePair
    return j2m.JsonToMetadata(
        request_rules=j2m.JsonToMetadata.MatchRules(
            rules=[
                # /v1/generate names its model `model_id` (the seeds' API). First, so that a `model`
                # in the same body still wins.
                j2m.JsonToMetadata.Rule(
                    selectors=[j2m.JsonToMetadata.Selector(key="model_id")],
                    on_present=kv(
                        metadata_namespace=METADATA_NAMESPACE,
                        key=MODEL_KEY,
                        type=j2m.JsonToMetadata.PROTOBUF_VALUE,
                    ),
                ),
                j2m.JsonToMetadata.Rule(
                    selectors=[j2m.JsonToMetadata.Selector(key=MODEL_KEY)],
                    # PROTOBUF_VALUE keeps the JSON type: a number or bool `model` is told apart from a name.
                    on_present=kv(
                        metadata_namespace=METADATA_NAMESPACE,
                        key=MODEL_KEY,
                        type=j2m.JsonToMetadata.PROTOBUF_VALUE,
                    ),
                    # Setting any metadata makes the filter clear the route cache. Envoy picks the route
                    # before header_to_metadata runs, so without this a header-only model would be ignored.
                    on_missing=kv(
                        metadata_namespace=METADATA_NAMESPACE,
                        key=MODEL_MISSING_KEY,
                        value=struct_pb2.Value(bool_value=True),
                    ),
                    on_error=kv(
                        metadata_namespace=METADATA_NAMESPACE,
                        key=BODY_INVALID_KEY,
                        value=struct_pb2.Value(bool_value=True),
                    ),
                ),
                *(_max_tokens_rules() if auth_mode == "api_key" else []),
            ],
            # Without this, `application/json; charset=utf-8` would silently skip the filter.
            allow_content_types_regex=regex_pb2.RegexMatcher(regex="(?i)application/json.*"),
        )
    )


# A client's x-request-id is kept when it fits in logs and engines' headers (they refuse long ones).
REQUEST_ID_MAX_LENGTH = 128
_REQUEST_ID = "request.headers['x-request-id']"
_KEPT_ID_HEADER = "x-gateway-kept-request-id"


def _append(key: str, value: str) -> mutation.HeaderMutation:
    # An empty value is not added (keep_empty_value is off): that is what drops an unfit request id.
    return mutation.HeaderMutation(
        append=base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, value=value),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
    )


def _early_header_mutation() -> extension_pb2.TypedExtensionConfig:
    """Runs before Envoy reads any header (request id, routing): see the module docstring."""
    fit = f"size({_REQUEST_ID}) <= {REQUEST_ID_MAX_LENGTH} && {_REQUEST_ID}.matches('^[A-Za-z0-9._:-]+$')"
    mutations = [
        mutation.HeaderMutation(
            remove_on_match=mutation.HeaderMutation.RemoveOnMatch(
                key_matcher=string_pb2.StringMatcher(prefix="x-envoy-")
            )
        ),
        _append(_KEPT_ID_HEADER, f"%CEL({fit} ? {_REQUEST_ID} : '')%"),
        mutation.HeaderMutation(remove="x-request-id"),
        _append("x-request-id", f"%REQ({_KEPT_ID_HEADER})%"),
        mutation.HeaderMutation(remove=_KEPT_ID_HEADER),
    ]
    return extension_pb2.TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation",
        typed_config=_packed(header_mutation_pb2.HeaderMutation(mutations=mutations)),
    )


def _usage_filters(auth_mode: str) -> list[hcm.HttpFilter]:
    """With API keys on: the engines' token usage into metadata (usage.py), last before the router."""
    return [build_usage_filter()] if auth_mode == "api_key" else []


def _tenancy_filters(auth_mode: str, credential: str) -> list[hcm.HttpFilter]:
    """With API keys on: the key check (its table over ECDS, keys.py), which runs once the body is in, so
    the route (the model) is known for the model check; then the per-key request limit (quota.py), whose
    bucket is the key id the check sets."""
    if auth_mode != "api_key":
        return []
    # The keys' live state (live.py: remaining-limit headers, the concurrency refusal) right after the
    # check, whose metadata names the key; before the quota filter, so a refused request uses no quota.
    return [build_key_filter(), build_live_filter(credential), build_quota_filter(credential)]


def build_connection_manager(
    settings: GatewaySettings, node: NodeParams, auth_mode: str = "none"
) -> hcm.HttpConnectionManager:
    return hcm.HttpConnectionManager(
        stat_prefix="gateway",
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(config_source=ads_source(), route_config_name=ROUTE_CONFIG_NAME),
        http_filters=[
            # First: the buffer filter resolves the route, which must already see the header's model.
            _http_filter("envoy.filters.http.header_to_metadata", _model_header_filter(settings)),
            _http_filter(
                "envoy.filters.http.buffer",
                buffer_pb2.Buffer(max_request_bytes=uint32(settings.max_request_body_bytes)),
            ),
            _http_filter("envoy.filters.http.json_to_metadata", _json_body_filter(auth_mode)),
            *_tenancy_filters(auth_mode, node.log_credential),
            # Priority shedding, entered only on the routes of saturated models (after the key check,
            # whose metadata holds the key's class): shedding.py.
            build_shedding_filter(),
            # /v1/generate (entered for that path only) and served_model renaming (entered only on the
            # routes of models that set it): generate.py.
            _http_filter(LUA_FILTER_NAME, build_generate_filter()),
            _http_filter(RENAME_FILTER_NAME, build_rename_filter()),
            # The prefix-affinity key, entered only on the routes of prefix-affine models: prefix_affinity.py.
            _http_filter(PREFIX_FILTER_NAME, build_prefix_filter()),
            *_usage_filters(auth_mode),
            # No x-envoy-expected-rq-timeout-ms or attempt count to the engines, no
            # x-envoy-upstream-service-time to clients.
            _http_filter("envoy.filters.http.router", router_pb2.Router(suppress_envoy_headers=True)),
        ],
        early_header_mutation_extensions=[_early_header_mutation()],
        local_reply_config=build_local_reply_config(settings),
        access_log=build_access_logs(
            settings.access_log, node.access_log_path, node.log_credential, keyed=auth_mode == "api_key"
        ),
        # With keys on, requests in flight are logged periodically (the keys' live state).
        access_log_options=access_log_options(keyed=auth_mode == "api_key"),
        # Streams are cut by idle timeouts, never by a whole-request timeout at this level.
        stream_idle_timeout=seconds(settings.stream_idle_timeout_s),
        # When a model server dies mid-stream, the client learns it 0.1 s later instead of Envoy's 1 s
        # default grace for flushing its own replies.
        delayed_close_timeout=seconds(0.1),
        request_timeout=seconds(settings.request_receive_timeout_s),
        request_headers_timeout=seconds(settings.request_headers_timeout_s),
        # Over this: 431 request_headers_too_large (local_reply.py), not an engine's plain-text 400.
        max_request_headers_kb=uint32(settings.max_request_headers_kb),
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(idle_timeout=seconds(3600)),
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        # Normalised paths keep the API allow-list in route.py from being dodged with `..` or `//`.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        # The OpenAI SDK sends `models.retrieve("org/name")` as /v1/models/org%2Fname. Envoy unescapes
        # %2F (and %5C) before normalising and routing, so the allow-list and the engines see the same path.
        path_with_escaped_slashes_action=hcm.HttpConnectionManager.UNESCAPE_AND_FORWARD,
        preserve_external_request_id=True,
        always_set_request_id_in_response=True,
    )


def build_listener(
    settings: GatewaySettings, node: NodeParams, auth_mode: str = "none"
) -> listener_pb2.Listener:
    address = node.listen_address or settings.listen_address
    port = node.listen_port or settings.listen_port
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=port)
        ),
        per_connection_buffer_limit_bytes=uint32(1024 * 1024),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_packed(build_connection_manager(settings, node, auth_mode)),
                    )
                ]
            )
        ],
    )
