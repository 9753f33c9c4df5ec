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

MODEL = "%DYNAMIC_METADATA(gateway:model)%"
BODY = "%LOCAL_REPLY_BODY%"


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


def reply_rules(settings: GatewaySettings) -> tuple[ReplyRule, ...]:
    return (
        # Envoy's own successful answers (GET /v1/models, /health) already carry their JSON body.
        ReplyRule("", "", BODY, status=200),
        ReplyRule(
            "invalid_request_error",
            "model_not_found",
            f"The model `{MODEL}` does not exist.",
            route_cel="xds.route_name == 'unknown-model'",
        ),
        ReplyRule(
            "invalid_request_error",
            "model_disabled",
            BODY,
            route_cel="xds.route_name.startsWith('disabled:')",
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
        ),
        ReplyRule(
            "server_error",
            "model_overloaded",
            f"The model `{MODEL}` is at its concurrency limit. Retry later.",
            flags=("UO",),
            headers=(("retry-after", "1"),),
        ),
        ReplyRule(
            "timeout_error",
            "upstream_timeout",
            f"The model server for `{MODEL}` did not answer in time.",
            flags=("UT", "SI"),
            new_status=504,
        ),
        ReplyRule(
            "server_error",
            "upstream_unavailable",
            f"The model server for `{MODEL}` could not be reached.",
            flags=("UF", "URX", "UC", "UR", "NC"),
        ),
        ReplyRule(
            "invalid_request_error",
            "request_too_large",
            f"The request body is larger than the gateway's limit of "
            f"{settings.max_request_body_bytes} bytes.",
            status=413,
        ),
        ReplyRule("invalid_request_error", "not_found", BODY, status=404),
        ReplyRule("invalid_request_error", "invalid_request", BODY, status=400),
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
                for k, v in rule.headers
            ],
        )
        for rule in reply_rules(settings)
    ]
    return hcm.LocalReplyConfig(mappers=mappers, body_format=_format("server_error", "gateway_error", BODY))
