"""OpenAI-style JSON bodies for every reply Envoy makes itself (no backend involved).

Each rule maps a kind of local reply (chosen by route name, response flag or status) to an
`{"error": {"message", "type", "code"}}` body. The table is data; order matters (first match wins).
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2

from control_plane.config.schema import GatewaySettings
from control_plane.xds.builders._common import struct, uint32
from control_plane.xds.builders.shedding import SHED_NAMESPACE

MODEL = "%DYNAMIC_METADATA(gateway:model)%"
BODY = "%LOCAL_REPLY_BODY%"
# Response header naming the error code of every reply Envoy makes itself (the body's `error.code`).
ERROR_CODE_HEADER = "x-gateway-error-code"
# The OpenAI SDKs read it before the status: `false` stops their retries of an error that a retry cannot
# cure (they retry every 5xx, a disabled model's 503 included, and 408/409/429).
NO_RETRY = (("x-should-retry", "false"),)
# The code of a reply no rule matched (the default body format below).
FALLBACK_CODE = "gateway_error"


@dataclass(frozen=True)
class ReplyRule:
    error_type: str
    code: str
    message: str
    route_cel: str | None = None  # a CEL expression on the request (e.g. its route name)
    flags: tuple[str, ...] = ()  # Envoy response flags, e.g. UH = no healthy upstream
    status: int | None = None  # match on this status ...
    new_status: int | None = None  # ... and/or answer with this one
    headers: tuple[tuple[str, str], ...] = ()


# The API-key check's refusals (keys.lua): it writes the code under this namespace and answers with a
# plain message, which the rule of that code wraps. (error type, code, extra headers); OpenAI's types.
KEY_ERROR_NAMESPACE = "gateway.key"
KEY_REFUSALS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("invalid_request_error", "invalid_api_key", NO_RETRY),
    ("invalid_request_error", "model_not_allowed", NO_RETRY),
    ("tokens", "rate_limit_exceeded", ()),
    ("insufficient_quota", "insufficient_quota", NO_RETRY),
    ("server_error", "keys_unavailable", (("retry-after", "1"),)),
    ("server_error", "key_check_failed", ()),
)


def _key_refused(code: str) -> str:
    namespace = f"metadata.filter_metadata['{KEY_ERROR_NAMESPACE}']"
    return f"'{KEY_ERROR_NAMESPACE}' in metadata.filter_metadata && {namespace}['error'] == '{code}'"


def reply_rules(settings: GatewaySettings) -> tuple[ReplyRule, ...]:
    return (
        # Envoy's own successful answers (GET /v1/models, /health) already carry their JSON body.
        ReplyRule("", "", BODY, status=200),
        *(
            ReplyRule(error_type, code, BODY, route_cel=_key_refused(code), headers=headers)
            for error_type, code, headers in KEY_REFUSALS
        ),
        # A request shed by priority while its model is saturated (shedding.lua; retry-after set there).
        ReplyRule(
            "server_error",
            "model_overloaded",
            BODY,
            route_cel=f"'{SHED_NAMESPACE}' in metadata.filter_metadata",
        ),
        # A key at its concurrency limit (live.lua): OpenAI's 429 for requests, retried after a second.
        ReplyRule(
            "requests",
            "rate_limit_exceeded",
            BODY,
            route_cel=_key_refused("concurrency_limit"),
            headers=(("retry-after", "1"),),
        ),
        # The per-key requests-per-minute limit (builders/quota.py): its 429 already carries OpenAI's JSON
        # body and headers; kept as it is (the fallback below would wrap it), whatever the route.
        ReplyRule(
            "", "rate_limit_exceeded", BODY, route_cel="response.code_details == 'rate_limited_by_quota'"
        ),
        ReplyRule(
            "invalid_request_error",
            "model_not_found",
            f"The model `{MODEL}` does not exist.",
            # unknown-model-info: GET /v1/models/{name}, the name read out of the path (listener.py).
            route_cel="xds.route_name == 'unknown-model' || xds.route_name == 'unknown-model-info'",
            headers=NO_RETRY,
        ),
        ReplyRule(
            "invalid_request_error",
            "model_disabled",
            BODY,
            route_cel="xds.route_name.startsWith('disabled:')",
            headers=NO_RETRY,
        ),
        ReplyRule(
            "server_error",
            "model_draining",
            BODY,
            route_cel="xds.route_name.startsWith('draining:')",
            headers=(("retry-after", "5"),),
        ),
        ReplyRule(
            "server_error",
            "model_unavailable",
            f"No healthy endpoint is available for the model `{MODEL}`. Retry later.",
            flags=("UH",),
            headers=(("retry-after", "1"),),
        ),
        # Upstream failures, each by its cause. A failure whose retry the retry budget refused carries
        # UO (overflow) next to its cause's flag, so the causes come first and model_overloaded is left
        # with the circuit breaker alone (max_requests / max_pending_requests full: UO and nothing else).
        # A final failure after retries also carries URX (retry limit exceeded) next to its cause's flag.
        ReplyRule(
            "timeout_error",
            "upstream_timeout",
            f"The model server for `{MODEL}` did not answer in time.",
            flags=("UT",),  # request_timeout_s, or the last try cut by the per-try idle timeout
            new_status=504,
        ),
        ReplyRule(
            "timeout_error",
            "upstream_timeout",
            f"The model server for `{MODEL}` did not answer in time.",
            flags=("SI",),  # the route's idle timeout after a whole request; a 408 SI is the client's
            status=504,
        ),
        ReplyRule(
            "server_error",
            "upstream_reset",
            f"The connection to the model server for `{MODEL}` broke before it answered. Retry later.",
            # UC: connection terminated (a killed replica); UR: reset by the server; LR: reset here
            # (e.g. the server half-closed early); UPE: a broken HTTP answer (502).
            flags=("UC", "UR", "LR", "UPE"),
        ),
        ReplyRule(
            "server_error",
            "upstream_unavailable",
            f"The model server for `{MODEL}` could not be reached. Retry later.",
            # UF: connection failed (refused, connect timeout); NC: no cluster (yet) for the model;
            # URX alone would be a retry limit with no cause flag: still "could not be reached".
            flags=("UF", "NC", "URX"),
        ),
        ReplyRule(
            "server_error",
            "model_overloaded",
            f"The model `{MODEL}` is at its concurrency limit. Retry later.",
            flags=("UO",),
            headers=(("retry-after", "1"),),
        ),
        ReplyRule(
            "invalid_request_error",
            "request_too_large",
            f"The request body is larger than the gateway's limit of "
            f"{settings.max_request_body_bytes} bytes.",
            status=413,
            headers=NO_RETRY,
        ),
        ReplyRule(
            "invalid_request_error",
            "request_headers_too_large",
            f"The request's headers are larger than the gateway's limit of "
            f"{settings.max_request_headers_kb} KiB.",
            status=431,
            headers=NO_RETRY,
        ),
        ReplyRule("invalid_request_error", "method_not_allowed", BODY, status=405, headers=NO_RETRY),
        # Envoy refuses CONNECT itself (no upgrade is configured) with a bare 403: say what it is.
        ReplyRule(
            "invalid_request_error",
            "method_not_allowed",
            "CONNECT is not supported: the gateway serves GET /v1/models and POST inference paths.",
            status=403,
            new_status=405,
            headers=(("allow", "GET, POST"), *NO_RETRY),
        ),
        # A client too slow to send its headers or whole request (after a stream-idle SI above, this is
        # Envoy's request_headers_timeout / request_timeout, which stop once the request is in).
        ReplyRule(
            "invalid_request_error",
            "request_timeout",
            f"The gateway did not receive the whole request in time (headers within "
            f"{settings.request_headers_timeout_s:g} s, the whole request within "
            f"{settings.request_receive_timeout_s:g} s).",
            status=408,
        ),
        ReplyRule("invalid_request_error", "not_found", BODY, status=404, headers=NO_RETRY),
        ReplyRule("invalid_request_error", "invalid_request", BODY, status=400, headers=NO_RETRY),
    )


def _format(
    rule_type: str, code: str, message: str
) -> substitution_format_string_pb2.SubstitutionFormatString:
    if not rule_type:
        return substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=message), content_type="application/json"
        )
    return substitution_format_string_pb2.SubstitutionFormatString(
        json_format=struct({"error": {"message": message, "type": rule_type, "code": code}})
    )


def _filter(rule: ReplyRule) -> accesslog_pb2.AccessLogFilter:
    parts: list[accesslog_pb2.AccessLogFilter] = []
    if rule.route_cel:
        expression = any_pb2.Any()
        expression.Pack(cel_pb2.ExpressionFilter(expression=rule.route_cel))
        parts.append(
            accesslog_pb2.AccessLogFilter(
                extension_filter=accesslog_pb2.ExtensionFilter(
                    name="envoy.access_loggers.extension_filters.cel", typed_config=expression
                )
            )
        )
    if rule.flags:
        parts.append(
            accesslog_pb2.AccessLogFilter(
                response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=rule.flags)
            )
        )
    if rule.status is not None:
        parts.append(
            accesslog_pb2.AccessLogFilter(
                status_code_filter=accesslog_pb2.StatusCodeFilter(
                    comparison=accesslog_pb2.ComparisonFilter(
                        op=accesslog_pb2.ComparisonFilter.EQ,
                        value=base_pb2.RuntimeUInt32(
                            default_value=rule.status, runtime_key=f"gateway.reply.{rule.status}"
                        ),
                    )
                )
            )
        )
    if len(parts) == 1:
        return parts[0]
    return accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(filters=parts))


def _headers(rule: ReplyRule) -> tuple[tuple[str, str], ...]:
    # The error code also goes out as a header: the access logs read it from there (access_log.py), so the
    # code logged and counted per model is the one the client got, decided once, by this table.
    return ((ERROR_CODE_HEADER, rule.code), *rule.headers) if rule.code else rule.headers


def build_local_reply_config(settings: GatewaySettings) -> hcm.LocalReplyConfig:
    mappers = [
        hcm.ResponseMapper(
            filter=_filter(rule),
            status_code=uint32(rule.new_status) if rule.new_status else None,
            body_format_override=_format(rule.error_type, rule.code, rule.message),
            headers_to_add=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=k, value=v),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
                for k, v in _headers(rule)
            ],
        )
        for rule in reply_rules(settings)
    ]
    return hcm.LocalReplyConfig(mappers=mappers, body_format=_format("server_error", FALLBACK_CODE, BODY))
