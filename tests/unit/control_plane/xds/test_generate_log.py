"""/v1/generate calls from Envoy's access-log entries: labels stay bounded, the outcome says what the
client saw, tokens and times come from the entry."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.xds.generate_log import GenerateCounter

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
            {
                "id": "llama3",
                "engine": "vllm",
                "endpoints": [{"url": "http://127.0.0.1:2"}],
                "scenarios": {"poem": {"user": "A poem about {inputs}"}},
            },
        ]
    }
)


def entry(
    scenario: str | None = "qa",
    status: int = 200,
    details: str = "via_upstream",
    path: str = "/v1/chat/completions",
    **extra: object,
) -> accesslog_pb2.HTTPAccessLogEntry:
    out = accesslog_pb2.HTTPAccessLogEntry()
    out.request.path = path
    out.response.response_code.value = status
    out.response.response_code_details = details
    out.common_properties.metadata.filter_metadata["gateway"].update({"model": "qwen"})
    if scenario is not None:
        out.common_properties.metadata.filter_metadata["gateway.generate"].update(
            {"scenario": scenario, "stream": False, **extra}
        )
    out.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(1500)
    return out


def counter() -> GenerateCounter:
    return GenerateCounter(ControlPlaneMetrics.create(), REGISTRY)


def test_only_generate_calls_are_taken() -> None:
    assert counter().record(entry()) is not None  # translated: the path is the engine's now
    assert counter().record(entry(scenario=None, path="/v1/generate?x=1")) is not None  # refused
    assert counter().record(entry(scenario=None, path="/v1/chat/completions")) is None


@pytest.mark.parametrize(
    ("scenario", "label"),
    [("qa", "qa"), ("poem", "poem"), ("none", "none"), ("made-up", "(other)"), (None, "(none)")],
)
def test_scenario_label_is_one_some_model_has_or_a_fixed_value(scenario: str | None, label: str) -> None:
    call = counter().classify(entry(scenario=scenario, path="/v1/generate"))
    assert call.scenario == label and call.model == "qwen2"


def test_outcome_tokens_and_duration() -> None:
    call = counter().classify(entry(prompt_tokens=12, completion_tokens=30))
    assert (call.code, call.prompt_tokens, call.completion_tokens, call.duration_s) == ("ok", 12, 30, 1.5)
    assert call.first_byte_s is None
    assert counter().classify(entry(status=500)).code == "upstream_error"
    local = entry(status=404, details="direct_response")
    local.response.response_headers["x-gateway-error-code"] = "model_not_found"
    assert counter().classify(local).code == "model_not_found"
    cut = entry()
    cut.common_properties.response_flags.upstream_remote_reset = True
    assert counter().classify(cut).code == "stream_interrupted"
    gone = entry()
    gone.common_properties.response_flags.downstream_connection_termination = True
    assert counter().classify(gone).code == "client_disconnected"
    # Negative or non-numeric token figures are not counted.
    assert counter().classify(entry(prompt_tokens=-3, completion_tokens="9")).prompt_tokens is None


def test_counts_reach_the_metrics() -> None:
    metrics = ControlPlaneMetrics.create()
    sink = GenerateCounter(metrics, REGISTRY)
    sink.record(entry(prompt_tokens=12, completion_tokens=30))
    sample = metrics.registry.get_sample_value
    assert (
        sample("llm_gateway_generate_tokens_total", {"model": "qwen2", "scenario": "qa", "kind": "prompt"})
        == 12
    )
    labels = {"model": "qwen2", "scenario": "qa", "status": "200", "code": "ok"}
    assert sample("llm_gateway_generate_requests_total", labels) == 1
