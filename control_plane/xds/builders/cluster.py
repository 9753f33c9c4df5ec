"""Model → Cluster: least-request, round-robin or prefix-affine (Maglev) balancing, circuit breakers,
outlier ejection, upstream HTTP options."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2, protocol_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, json_format, message

from control_plane.state import ModelState
from control_plane.xds.builders._common import ads_source, seconds, uint32
from control_plane.xds.builders.prefix_affinity import LB_POLICY_NAME, is_prefix_affine, maglev_policy
from control_plane.xds.builders.priority import apply_priority_reserve
from control_plane.xds.resources import cluster_name

_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _circuit_breakers(model: ModelState) -> circuit_breaker_pb2.CircuitBreakers:
    limits = model.config.limits
    retry = model.config.retry
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                priority=base_pb2.RoutingPriority.DEFAULT,
                # HTTP/1.1 upstreams carry one request per connection at a time.
                max_connections=uint32(limits.max_concurrent_requests),
                max_requests=uint32(limits.max_concurrent_requests),
                max_pending_requests=uint32(limits.max_pending_requests),
                # Retries in progress at once, as a share of active + pending requests. When one of N
                # replicas dies, its 1/N of the requests in flight all need a retry at the same moment,
                # against the (N-1)/N still active: 100/(N-1) %. Envoy's default (20 %, at least 3) let
                # 11 of 16 be lost with two replicas. The default of 100 % covers any N >= 2 without
                # tying the cluster (CDS) to the endpoint count; it cannot raise load past the limits
                # above, since every retry is an active request counted against max_requests, and the
                # causes that mean "full" are not retried at all (retry.py).
                retry_budget=circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
                    budget_percent=percent_pb2.Percent(value=retry.budget_percent),
                    min_retry_concurrency=uint32(retry.min_retry_concurrency),
                ),
            )
        ]
    )


def _outlier_detection(model: ModelState) -> outlier_detection_pb2.OutlierDetection:
    od = model.config.outlier_detection
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=uint32(od.consecutive_5xx),
        consecutive_gateway_failure=uint32(od.consecutive_5xx),
        # Connect failures and resets count apart from HTTP 5xx so a dead host is ejected fast.
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=uint32(od.consecutive_local_origin_failure),
        interval=seconds(od.interval_s),
        base_ejection_time=seconds(od.base_ejection_time_s),
        max_ejection_percent=uint32(od.max_ejection_percent),
    )


def _load_balancing(model: ModelState) -> cluster_pb2.LoadBalancingPolicy:
    config: message.Message
    if model.config.load_balancing == "round_robin":
        name, config = "envoy.load_balancing_policies.round_robin", round_robin_pb2.RoundRobin()
    elif is_prefix_affine(model.config):
        # Consistent hashing (Maglev) on the route's prefix key, with bounded load (prefix_affinity.py).
        name, config = LB_POLICY_NAME, maglev_policy(model.config)
    else:
        # A full scan, not the default two random choices: model replicas are few, and with two of them
        # two choices drawn with replacement pick the same host half of the time.
        name = "envoy.load_balancing_policies.least_request"
        config = least_request_pb2.LeastRequest(selection_method=least_request_pb2.LeastRequest.FULL_SCAN)
    packed = any_pb2.Any()
    packed.Pack(config)
    return cluster_pb2.LoadBalancingPolicy(
        policies=[
            cluster_pb2.LoadBalancingPolicy.Policy(
                typed_extension_config=extension_pb2.TypedExtensionConfig(name=name, typed_config=packed)
            )
        ]
    )


def _http_options() -> any_pb2.Any:
    options = http_protocol_options_pb2.HttpProtocolOptions(
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(idle_timeout=seconds(60)),
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        ),
    )
    packed = any_pb2.Any()
    packed.Pack(options)
    return packed


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(cluster: cluster_pb2.Cluster, overrides: dict[str, Any]) -> cluster_pb2.Cluster:
    """Merge the operator's raw fields (Envoy's YAML field names) over the cluster: maps merge, lists and
    scalars replace. Done on the JSON form because protobuf's MergeFrom cannot set a field back to its
    default value (e.g. `lb_policy: ROUND_ROBIN`)."""
    base = json_format.MessageToDict(cluster, preserving_proto_field_name=True)
    return json_format.ParseDict(_deep_merge(base, overrides), cluster_pb2.Cluster())


def build_cluster(model: ModelState) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=cluster_name(model.id),
        type=cluster_pb2.Cluster.DiscoveryType.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=seconds(model.config.limits.connect_timeout_s),
        load_balancing_policy=_load_balancing(model),
        circuit_breakers=_circuit_breakers(model),
        outlier_detection=_outlier_detection(model),
        # No panic routing: with health coming from the control plane, sending traffic to hosts known to
        # be down when too few are healthy only turns a 503 into a slow failure.
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=0)
        ),
        typed_extension_protocol_options={_HTTP_OPTIONS_KEY: _http_options()},
    )
    cluster = apply_priority_reserve(cluster, model)  # a reserve for high priority (priority.py)
    if model.config.cluster_overrides:
        cluster = apply_overrides(cluster, model.config.cluster_overrides)
    return cluster
