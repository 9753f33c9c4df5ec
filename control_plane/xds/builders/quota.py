"""The per-key requests-per-minute limit in Envoy: the `rate_limit_quota` HTTP filter, whose quota server
(RLQS) is the control plane (control_plane/tenancy/quota.py) over the ADS connection's cluster.

Every request carrying `x-gateway-key-id` (set by the API-key check in front, builders/keys.py) falls in
the bucket `{key: <key id>}`; a request without it is not counted. Envoy enforces the token bucket the
server assigns to each bucket, all in Envoy, and reports usage every 5 s (hard-coded in Envoy 1.40, whatever
`reporting_interval` says). Until a bucket's first assignment arrives, and after an assignment expired (the
control plane away longer than its time to live), requests are allowed: a token bucket there crashes
Envoy 1.40, and a denial would turn a control-plane outage into a gateway outage.

A denied request gets a 429 with OpenAI's error body (type `requests`, code `rate_limit_exceeded`), which
the OpenAI SDKs raise as `RateLimitError`, with `retry-after` and `x-gateway-error-code`; the local reply
mapper's rule for it (local_reply.py, response code details `rate_limited_by_quota`) keeps that body.

The filter belongs in the listener (LDS), after the key check; it carries nothing that changes with keys
or limits (those travel on the RLQS stream), so key changes never touch the listener.
"""

from __future__ import annotations

import json

from envoy.config.core.v3 import base_pb2, extension_pb2, grpc_service_pb2
from envoy.extensions.filters.http.rate_limit_quota.v3 import rate_limit_quota_pb2 as rlq
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import http_inputs_pb2
from envoy.type.v3 import http_status_pb2, ratelimit_strategy_pb2
from google.protobuf import any_pb2, message, wrappers_pb2
from xds.core.v3 import extension_pb2 as xds_extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from control_plane.xds.builders._common import seconds
from control_plane.xds.builders.access_log import CONTROL_PLANE_CLUSTER
from control_plane.xds.builders.keys import KEY_ID_HEADER
from control_plane.xds.builders.local_reply import ERROR_CODE_HEADER

QUOTA_FILTER_NAME = "gateway.quota"
DOMAIN = "gateway"
BUCKET_KEY = "key"  # BucketId {key: <key id>}: the quota server reads the key id under this name
RATE_LIMIT_CODE = "rate_limit_exceeded"
# Envoy's response code details of a request this filter denied (the local reply rule matches it).
DENIED_DETAILS = "rate_limited_by_quota"
# A fixed hint: the filter's reply is static, and most keys refill within a second or a few.
RETRY_AFTER_S = 1
# Ignored by Envoy 1.40 (it reports every 5 s) but required by the API.
REPORTING_INTERVAL_S = 5
# After an assignment's time to live (the control plane away): allow, for this long, then allow
# (no assignment) until the stream is back.
EXPIRED_FALLBACK_S = 60
RATE_LIMIT_MESSAGE = (
    "Rate limit reached for requests per minute on this API key. Retry after the time in the "
    "`retry-after` header, or ask the gateway's operator for a higher limit."
)

_ALLOW_ALL = ratelimit_strategy_pb2.RateLimitStrategy(
    blanket_rule=ratelimit_strategy_pb2.RateLimitStrategy.ALLOW_ALL
)


def _packed(msg: message.Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def rate_limit_body() -> bytes:
    """The 429's body, OpenAI's error shape."""
    error = {"message": RATE_LIMIT_MESSAGE, "type": "requests", "code": RATE_LIMIT_CODE}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def _deny_response() -> rlq.RateLimitQuotaBucketSettings.DenyResponseSettings:
    headers = (
        ("retry-after", str(RETRY_AFTER_S)),
        (ERROR_CODE_HEADER, RATE_LIMIT_CODE),
        ("content-type", "application/json"),
    )
    return rlq.RateLimitQuotaBucketSettings.DenyResponseSettings(
        http_status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
        http_body=wrappers_pb2.BytesValue(value=rate_limit_body()),
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=key, value=value),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for key, value in headers
        ],
    )


def _bucket_settings() -> rlq.RateLimitQuotaBucketSettings:
    settings = rlq.RateLimitQuotaBucketSettings(
        reporting_interval=seconds(REPORTING_INTERVAL_S),
        # ALLOW_ALL only: a token bucket here makes Envoy 1.40 crash on the first request.
        no_assignment_behavior=rlq.RateLimitQuotaBucketSettings.NoAssignmentBehavior(
            fallback_rate_limit=_ALLOW_ALL
        ),
        expired_assignment_behavior=rlq.RateLimitQuotaBucketSettings.ExpiredAssignmentBehavior(
            expired_assignment_behavior_timeout=seconds(EXPIRED_FALLBACK_S), fallback_rate_limit=_ALLOW_ALL
        ),
        deny_response_settings=_deny_response(),
    )
    settings.bucket_id_builder.bucket_id_builder[BUCKET_KEY].custom_value.CopyFrom(
        extension_pb2.TypedExtensionConfig(
            name="key_id",
            typed_config=_packed(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=KEY_ID_HEADER)),
        )
    )
    return settings


def build_quota_config(
    credential: str, cluster: str = CONTROL_PLANE_CLUSTER, domain: str = DOMAIN
) -> rlq.RateLimitQuotaFilterConfig:
    """The filter's config: the quota server at `cluster` (the control plane's), called with the
    deployment-wide stream credential (xds/auth.py, as the access-log stream)."""
    metadata = [base_pb2.HeaderValue(key="authorization", value=f"Bearer {credential}")] if credential else []
    # No predicates: every request falls to on_no_match, whose bucket is the key id header's value.
    matchers = matcher_pb2.Matcher(
        on_no_match=matcher_pb2.Matcher.OnMatch(
            action=xds_extension_pb2.TypedExtensionConfig(
                name="key_bucket", typed_config=_packed(_bucket_settings())
            )
        )
    )
    return rlq.RateLimitQuotaFilterConfig(
        domain=domain,
        rlqs_server=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster),
            initial_metadata=metadata,
        ),
        bucket_matchers=matchers,
    )


def build_quota_filter(
    credential: str, cluster: str = CONTROL_PLANE_CLUSTER, domain: str = DOMAIN
) -> hcm.HttpFilter:
    """The HTTP filter for the connection manager's chain (after the key check, before the router)."""
    return hcm.HttpFilter(
        name=QUOTA_FILTER_NAME, typed_config=_packed(build_quota_config(credential, cluster, domain))
    )
