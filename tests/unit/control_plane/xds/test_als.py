"""Local replies from Envoy's access-log entries: the model label stays bounded, the code is the one the
client got, the stage says whether Envoy's cluster stats have the reply already; the node credential is
carried in the listener's access-log stream only when the node gave one."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from control_plane.config import parse_registry
from control_plane.config.schema import AccessLogSettings
from control_plane.metrics import ControlPlaneMetrics
from control_plane.state import NodeParams, build_state
from control_plane.xds.als import NO_MODEL, UNKNOWN_MODEL, LocalReplyCounter
from control_plane.xds.builders import build_snapshot
from control_plane.xds.builders.access_log import LOCAL_REPLY_FILTER, build_access_logs
from control_plane.xds.resources import LISTENER

pytestmark = pytest.mark.unit

REGISTRY = parse_registry(
    {
        "models": [
            {
                "id": "qwen2",
                "aliases": ["qwen"],
                "engine": "tgi",
                "endpoints": [{"url": "http://127.0.0.1:1"}],
            },
            {"id": "llama3", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:2"}]},
        ]
    }
)


def entry(
    model: object = None, code: str | None = None, status: int = 503, upstream: bool = False
) -> accesslog_pb2.HTTPAccessLogEntry:
    out = accesslog_pb2.HTTPAccessLogEntry()
    out.response.response_code.value = status
    if code is not None:
        out.response.response_headers["x-gateway-error-code"] = code
    if model is not None:
        out.common_properties.metadata.filter_metadata["gateway"].update({"model": model})
    if upstream:
        out.common_properties.upstream_remote_address.socket_address.address = "127.0.0.1"
    return out


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("qwen", "qwen2"),
        ("qwen2", "qwen2"),
        ("llama3", "llama3"),
        ("gpt-9", UNKNOWN_MODEL),
        ("x" * 5000, UNKNOWN_MODEL),
        (None, NO_MODEL),
        (42, NO_MODEL),
        ("", NO_MODEL),
    ],
)
def test_model_label_is_a_known_id_or_one_of_two_bounded_values(model: object, expected: str) -> None:
    counter = LocalReplyCounter(ControlPlaneMetrics.create(), REGISTRY)
    assert counter.classify(entry(model, "model_not_found", 404)).model == expected


def test_code_and_stage_come_from_the_reply_rule_table() -> None:
    counter = LocalReplyCounter(ControlPlaneMetrics.create(), REGISTRY)
    assert counter.classify(entry("qwen", "model_draining")).stage == "route"
    assert counter.classify(entry("qwen", "model_unavailable")).stage == "upstream"  # matched on flag UH
    assert counter.classify(entry("qwen", "upstream_timeout", 504, upstream=True)).stage == "upstream"
    assert counter.classify(entry("qwen", "method_not_allowed", 405)).stage == "route"
    # No header (a reply no rule matched) or a header that is not a code: the fallback code.
    assert counter.classify(entry("qwen", None, 500)).code == "gateway_error"
    assert counter.classify(entry("qwen", "bad code\n", 500)).code == "gateway_error"


def test_counts_and_the_status_page_figures() -> None:
    metrics = ControlPlaneMetrics.create()
    counter = LocalReplyCounter(metrics, REGISTRY)
    for _ in range(3):
        counter.record(entry("qwen", "model_draining"))
    counter.record(entry("qwen2", "upstream_timeout", 504, upstream=True))  # in the load reports already
    counter.record(entry("gpt-9", "model_not_found", 404))
    value = metrics.registry.get_sample_value
    labels = {"model": "qwen2", "code": "model_draining", "status": "503", "stage": "route"}
    assert value("llm_gateway_local_replies_total", labels) == 3
    assert (
        value(
            "llm_gateway_local_replies_total",
            {"model": UNKNOWN_MODEL, "code": "model_not_found", "status": "404", "stage": "route"},
        )
        == 1
    )
    assert counter.unreported_errors() == {"qwen2": 3}


def test_a_registry_change_renames_nothing_it_should_not() -> None:
    counter = LocalReplyCounter(ControlPlaneMetrics.create(), REGISTRY)
    counter.follow_registry(parse_registry({"models": [{"id": "new", "engine": "vllm", "endpoints": []}]}))
    assert counter.classify(entry("qwen")).model == UNKNOWN_MODEL
    assert counter.classify(entry("new")).model == "new"


def test_access_logs_of_a_node() -> None:
    settings = AccessLogSettings(path="/var/log/gw.log")
    logs = build_access_logs(settings, "/node/own.log", "xds1.token")
    assert [log.name for log in logs] == ["envoy.access_loggers.file", "envoy.access_loggers.http_grpc"]
    grpc_config = als_pb2.HttpGrpcAccessLogConfig()
    logs[1].typed_config.Unpack(grpc_config)
    service = grpc_config.common_config.grpc_service
    assert [(m.key, m.value) for m in service.initial_metadata] == [("authorization", "Bearer xds1.token")]
    assert "via_upstream" in LOCAL_REPLY_FILTER
    off = AccessLogSettings(count_local_replies=False, count_generate=False)
    assert build_access_logs(off, None, "") == []
    # One stream carries what either counter asked for.
    only_generate = build_access_logs(AccessLogSettings(count_local_replies=False), None, "")
    assert len(only_generate) == 1
    expression = only_generate[0].filter.extension_filter.typed_config.value.decode()
    assert "/v1/generate" in expression and "via_upstream" not in expression


def test_the_listener_carries_the_nodes_log_path_and_credential() -> None:
    state = build_state(REGISTRY, lambda host: host)
    listener = next(
        iter(
            build_snapshot(state, NodeParams(access_log_path="/x/a.log", log_credential="t"))
            .resources[LISTENER]
            .values()
        )
    )
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.access_log[0].name == "envoy.access_loggers.file"
    assert "/x/a.log" in str(manager.access_log[0].typed_config.value)
    assert manager.request_timeout.seconds == 10 and manager.request_headers_timeout.seconds == 5
    assert (
        manager.early_header_mutation_extensions[0].name == "envoy.http.early_header_mutation.header_mutation"
    )
