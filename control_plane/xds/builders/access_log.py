"""The HTTP connection manager's access logs: a file with one line per request, and the errors Envoy
answers itself streamed to the control plane (gRPC access log service, `control_plane/xds/als.py`).

Both are part of the listener (LDS): they change with the gateway settings and the node, never with models.

The file logger writes every request: time, request id, model (as the client named it), route, endpoint,
status, error code (replies Envoy made itself; `x-gateway-error-code`, set by local_reply.py), Envoy's
response flags and details, duration, time to the first upstream byte, bytes in and out. Rotation: rename
the file and `POST /reopen_logs` to Envoy's admin (control_plane/devstack/logrotate.py does it).

The gRPC logger sends only replies Envoy made itself with a 4xx/5xx status (a CEL filter on the response
code details) and calls of /v1/generate (its metrics per model and scenario), so other traffic costs
nothing there. Envoy buffers its entries (flushed every second) and
drops them rather than wait when the stream is backed up: a flood of bad requests cannot stall requests.
"""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, grpc_service_pb2, substitution_format_string_pb2
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.data.accesslog.v3 import accesslog_pb2 as accesslog_data_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf import any_pb2, message

from control_plane.config.schema import AccessLogSettings
from control_plane.xds.builders._common import seconds, struct
from control_plane.xds.builders.generate import GENERATE_NAMESPACE
from control_plane.xds.builders.local_reply import ERROR_CODE_HEADER
from control_plane.xds.builders.usage import TOKEN_USAGE_NAMESPACE

# The bootstrap's cluster of the control plane (envoy/bootstrap.yaml): ADS, LRS and this log share it.
CONTROL_PLANE_CLUSTER = "xds_cluster"
LOCAL_REPLY_LOG_NAME = "gateway-local-replies"
# Replies Envoy made itself (direct responses, filter and router replies), errors only.
LOCAL_REPLY_FILTER = "response.code >= 400 && response.code_details != 'via_upstream'"
# Every call of the seeds' API, counted per model and scenario (xds/generate_log.py).
GENERATE_PATH = "/v1/generate"
# Every request that passed the API-key check (keys.lua writes the key into this metadata), for the
# per-key usage accounting (tenancy/usage*.py): with keys on, that is all traffic.
KEYED_FILTER = "'gateway' in metadata.filter_metadata && 'key' in metadata.filter_metadata['gateway']"
# Requests a fallback model served (builders/fallback.py names those routes), counted per model and
# fallback (control_plane/overload/sinks.py).
FALLBACK_FILTER = "xds.route_name.startsWith('fallback:')"
# With keys on, a request in flight is logged this often (the keys' live state counts requests in flight
# from these entries: tenancy/live_counts.py).
LIVE_LOG_INTERVAL_S = 0.5
_PERIODIC = accesslog_data_pb2.AccessLogType.DownstreamPeriodic
# The generate filter rewrites a call's path to the engine's; translated calls carry its metadata instead.
GENERATE_FILTER = (
    f"request.url_path == '{GENERATE_PATH}' || '{GENERATE_NAMESPACE}' in metadata.filter_metadata"
)

# Field order is the order in the file (Envoy keeps it).
JSON_FIELDS: dict[str, str] = {
    "time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "model": "%DYNAMIC_METADATA(gateway:model)%",
    "key": "%DYNAMIC_METADATA(gateway:key:key_name)%",  # the API key's name (never the key), with keys on
    "route": "%ROUTE_NAME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH):256%",
    "status": "%RESPONSE_CODE%",
    "error": f"%RESP({ERROR_CODE_HEADER.upper()})%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "endpoint": "%UPSTREAM_HOST_NAME%",
    "upstream": "%UPSTREAM_HOST%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "duration_ms": "%DURATION%",
    "ttfb_ms": "%RESPONSE_DURATION%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "user_agent": "%REQ(USER-AGENT):128%",
}


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


# With keys on: the engine's token counts (usage.py's typed metadata), per request.
_USAGE = f"metadata.typed_filter_metadata['{TOKEN_USAGE_NAMESPACE}']"
TOKEN_FIELDS: dict[str, str] = {
    "prompt_tokens": f"%CEL({_USAGE}.input_tokens)%",
    "completion_tokens": f"%CEL({_USAGE}.output_tokens)%",
}


def _log_format(fmt: str, keyed: bool = False) -> substitution_format_string_pb2.SubstitutionFormatString:
    fields: dict[str, object] = {**JSON_FIELDS, **(TOKEN_FIELDS if keyed else {})}
    if fmt == "json":
        return substitution_format_string_pb2.SubstitutionFormatString(json_format=struct(fields))
    line = " ".join(f"{key}={value}" for key, value in fields.items()) + "\n"
    return substitution_format_string_pb2.SubstitutionFormatString(
        text_format_source=base_pb2.DataSource(inline_string=line)
    )


def _cel(expression: str) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        extension_filter=accesslog_pb2.ExtensionFilter(
            name="envoy.access_loggers.extension_filters.cel",
            typed_config=_packed(cel_pb2.ExpressionFilter(expression=expression)),
        )
    )


def _periodic(exclude: bool) -> accesslog_pb2.AccessLogFilter:
    return accesslog_pb2.AccessLogFilter(
        log_type_filter=accesslog_pb2.LogTypeFilter(types=[_PERIODIC], exclude=exclude)
    )


def file_access_log(path: str, fmt: str, keyed: bool = False) -> accesslog_pb2.AccessLog:
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.file",
        # With keys on, the connection manager logs requests in flight periodically (for the keys' live
        # state): the file keeps one line per request.
        filter=_periodic(exclude=True) if keyed else None,
        typed_config=_packed(file_pb2.FileAccessLog(path=path, log_format=_log_format(fmt, keyed))),
    )


def _control_plane_filter(expression: str, live: bool) -> accesslog_pb2.AccessLogFilter:
    """`expression`'s entries at their end; with `live`, also the keyed requests' periodic entries."""
    if not live:
        return _cel(expression)
    ended = accesslog_pb2.AccessLogFilter(
        and_filter=accesslog_pb2.AndFilter(filters=[_periodic(exclude=True), _cel(expression)])
    )
    in_flight = accesslog_pb2.AccessLogFilter(
        and_filter=accesslog_pb2.AndFilter(filters=[_periodic(exclude=False), _cel(KEYED_FILTER)])
    )
    return accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(filters=[ended, in_flight]))


def control_plane_log(
    credential: str, expression: str, flush_s: float = 1.0, live: bool = False
) -> accesslog_pb2.AccessLog:
    """The entries `expression` selects, streamed to the control plane, which counts them: Envoy's own
    error replies per model and code, /v1/generate calls per model and scenario, keyed requests. `live`:
    keyed requests in flight too, every LIVE_LOG_INTERVAL_S (the keys' live state, tenancy/live.py)."""
    metadata = (
        # The deployment's access-log credential, checked like the ADS and LRS streams (xds/auth.py).
        [base_pb2.HeaderValue(key="authorization", value=f"Bearer {credential}")] if credential else []
    )
    config = als_pb2.HttpGrpcAccessLogConfig(
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name=LOCAL_REPLY_LOG_NAME,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=CONTROL_PLANE_CLUSTER),
                initial_metadata=metadata,
            ),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=seconds(flush_s),
        ),
        additional_response_headers_to_log=[ERROR_CODE_HEADER],
    )
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=_control_plane_filter(expression, live),
        typed_config=_packed(config),
    )


def build_access_logs(
    settings: AccessLogSettings, node_path: str | None, credential: str, keyed: bool = False
) -> list[accesslog_pb2.AccessLog]:
    """The node's access logs: its own file path (node metadata) wins over the registry's."""
    logs = []
    path = node_path or settings.path
    if path:
        logs.append(file_access_log(path, settings.format, keyed))
    selected = [
        f"({expression})"
        for expression, wanted in (
            (LOCAL_REPLY_FILTER, settings.count_local_replies),
            (GENERATE_FILTER, settings.count_generate),
            (KEYED_FILTER, keyed),
            (FALLBACK_FILTER, settings.count_local_replies),
        )
        if wanted
    ]
    if selected:
        # Keyed requests are counted against tokens-per-minute limits: the sooner they arrive, the smaller
        # the overrun of a key going over (a quarter of a second, at a few more gRPC messages per second).
        flush_s = 0.25 if keyed else 1.0
        logs.append(control_plane_log(credential, " || ".join(selected), flush_s, live=keyed))
    return logs


def access_log_options(keyed: bool) -> hcm.HttpConnectionManager.HcmAccessLogOptions | None:
    """With keys on: requests in flight logged every LIVE_LOG_INTERVAL_S (only the control plane's log
    takes those entries, only for keyed requests: see _control_plane_filter)."""
    if not keyed:
        return None
    interval = seconds(LIVE_LOG_INTERVAL_S)
    return hcm.HttpConnectionManager.HcmAccessLogOptions(access_log_flush_interval=interval)
