"""Calls of /v1/generate (the seeds' API) counted per model and scenario, from Envoy's access-log stream.

The seeds' dashboards showed, per model: requests, P95/P99 latency, tokens in and out, errors by kind. Envoy's
own stats have none of it per scenario (the scenario lives in the body), so the generate Lua filter
(builders/generate.lua) writes `scenario`, `stream` and, from the engine's answer, `prompt_tokens`,
`completion_tokens` into the dynamic metadata namespace `gateway.generate`; the listener's gRPC access log
sends every /v1/generate call (builders/access_log.py, GENERATE_FILTER) and this sink counts:

    llm_gateway_generate_requests_total{model, scenario, status, code}
    llm_gateway_generate_duration_seconds{model, scenario, stream}     (histogram: P95/P99)
    llm_gateway_generate_time_to_first_byte_seconds{model, scenario}   (streams: about the TTFT)
    llm_gateway_generate_tokens_total{model, scenario, kind}           (prompt, completion)

Labels stay bounded whatever clients send: `model` is a registry id, (unknown) or (none) (log_entries.py);
`scenario` is a scenario some model has, `none` (the call named none), (none) (refused before translation:
no model, no inputs, an unknown scenario or key) or (other); `code` is `ok`, the gateway's error code
(the local reply's header), `upstream_error` (an engine's error answer, see `status`), `client_disconnected`
or `stream_interrupted` (a 200 cut before its end).
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.config.schema import Registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.xds.als import reply_code
from control_plane.xds.builders.access_log import GENERATE_PATH
from control_plane.xds.builders.generate import GENERATE_NAMESPACE
from control_plane.xds.log_entries import ModelNames, metadata_fields, number_field, string_field

NOT_TRANSLATED = "(none)"
OTHER_SCENARIO = "(other)"
NO_SCENARIO = "none"  # what the Lua filter writes for a call that named no scenario


@dataclass(frozen=True)
class GenerateCall:
    model: str
    scenario: str
    status: int
    code: str
    stream: bool
    duration_s: float | None
    first_byte_s: float | None
    prompt_tokens: float | None
    completion_tokens: float | None


def _seconds(entry: accesslog_pb2.HTTPAccessLogEntry, field: str) -> float | None:
    common = entry.common_properties
    if not common.HasField(field):
        return None
    value = getattr(common, field)
    return float(value.seconds + value.nanos / 1e9)


def _outcome(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    response = entry.response
    status = response.response_code.value
    if status >= 400:
        return "upstream_error" if response.response_code_details == "via_upstream" else reply_code(entry)
    flags = entry.common_properties.response_flags
    if flags.downstream_connection_termination or flags.downstream_remote_reset:
        return "client_disconnected"
    if any(value for _, value in flags.ListFields()):
        return "stream_interrupted"  # a reset, an idle timeout... after the 200 went out
    return "ok"


class GenerateCounter:
    def __init__(self, metrics: ControlPlaneMetrics, registry: Registry) -> None:
        self._metrics = metrics
        self._names = ModelNames(registry)
        self._scenarios: frozenset[str] = frozenset()
        self.follow_registry(registry)

    def follow_registry(self, registry: Registry) -> None:
        self._names.follow_registry(registry)
        self._scenarios = frozenset(name for model in registry.models for name in model.generate_scenarios)

    async def follow(self, registry: Registry) -> None:
        """A registry listener (ControlPlane.add_registry_listener)."""
        self.follow_registry(registry)

    @staticmethod
    def wanted(entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
        """GENERATE_FILTER again: translated calls (their path is the engine's now) and refused ones."""
        if GENERATE_NAMESPACE in entry.common_properties.metadata.filter_metadata:
            return True
        return entry.request.path.split("?", 1)[0] == GENERATE_PATH

    def classify(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> GenerateCall:
        fields = metadata_fields(entry, GENERATE_NAMESPACE)
        scenario = string_field(fields, "scenario")
        if scenario is None:
            scenario = NOT_TRANSLATED
        elif scenario != NO_SCENARIO and scenario not in self._scenarios:
            scenario = OTHER_SCENARIO
        stream = fields.get("stream")
        return GenerateCall(
            model=self._names.label(entry),
            scenario=scenario,
            status=entry.response.response_code.value,
            code=_outcome(entry),
            stream=bool(stream is not None and stream.bool_value),
            duration_s=_seconds(entry, "time_to_last_downstream_tx_byte"),
            first_byte_s=_seconds(entry, "time_to_first_downstream_tx_byte"),
            prompt_tokens=number_field(fields, "prompt_tokens"),
            completion_tokens=number_field(fields, "completion_tokens"),
        )

    def record(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> GenerateCall | None:
        if not self.wanted(entry):
            return None
        call = self.classify(entry)
        metrics = self._metrics
        metrics.generate_requests.labels(call.model, call.scenario, str(call.status), call.code).inc()
        if call.duration_s is not None:
            metrics.generate_duration.labels(call.model, call.scenario, str(call.stream).lower()).observe(
                call.duration_s
            )
        if call.stream and call.code == "ok" and call.first_byte_s is not None:
            metrics.generate_first_byte.labels(call.model, call.scenario).observe(call.first_byte_s)
        for kind, tokens in (("prompt", call.prompt_tokens), ("completion", call.completion_tokens)):
            if tokens:
                metrics.generate_tokens.labels(call.model, call.scenario, kind).inc(tokens)
        return call
