"""The packaged metric map, operator overrides and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.config.schema import EngineKind
from control_plane.telemetry.errors import MetricMapError
from control_plane.telemetry.metric_map import (
    GaugeSpec,
    default_metric_map,
    load_metric_map,
    parse_metric_map,
)
from control_plane.telemetry.parse import signals_from_text

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


def test_packaged_map_covers_every_engine_of_the_registry():
    mapping = load_metric_map(None)
    assert mapping == default_metric_map()
    for kind in EngineKind:
        engine = mapping.engine(str(kind))
        assert engine is not None and engine.queue_depth is not None, kind
    vllm = mapping.engines["vllm"]
    assert vllm.kv_cache_usage == GaugeSpec(
        metrics=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"), aggregate="mean"
    )
    # Unit conversions are data.
    assert mapping.gpu.gpu_utilization is not None and mapping.gpu.gpu_utilization.scale == 0.01
    assert mapping.gpu.gpu_memory_used_bytes is not None
    assert mapping.gpu.gpu_memory_used_bytes.scale == 1024 * 1024


def test_override_file_is_layered_over_the_packaged_map():
    mapping = load_metric_map(DATA / "metric_map_override.yaml")
    assert set(mapping.engines) == {"vllm", "sglang", "tgi", "tei", "llamacpp"}
    assert mapping.engines["tgi"] == default_metric_map().engines["tgi"]  # untouched
    assert mapping.gpu == default_metric_map().gpu
    # The engine it names is replaced whole: vLLM now only has the renamed queue.
    vllm = mapping.engines["vllm"]
    assert vllm.queue_depth == GaugeSpec(metrics=("custom:vllm_queue",), aggregate="max")
    assert vllm.kv_cache_usage is None

    llamacpp = signals_from_text((DATA / "llamacpp.prom").read_text(), "llamacpp", mapping, now=0)
    assert (llamacpp.queue_depth, llamacpp.running, llamacpp.kv_cache_usage) == (5, 2, 0.4)


def test_override_can_replace_the_whole_map(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text(
        "inherit_defaults: false\n"
        "engines:\n"
        "  vllm:\n"
        "    queue_depth: [vllm:num_requests_waiting]\n"
        "    kv_cache_usage: [vllm:kv_cache_usage_perc]\n"
        "gpu:\n"
        "  gpu_utilization: {metrics: [nv_gpu_utilization], scale: 1}\n"
    )
    mapping = load_metric_map(path)
    assert set(mapping.engines) == {"vllm"}
    # A bare list takes the signal's default aggregation.
    assert mapping.engines["vllm"].queue_depth == GaugeSpec(
        metrics=("vllm:num_requests_waiting",), aggregate="sum"
    )
    assert mapping.engines["vllm"].kv_cache_usage is not None
    assert mapping.engines["vllm"].kv_cache_usage.aggregate == "mean"
    assert mapping.gpu.gpu_memory_used_bytes is None
    s = signals_from_text("nv_gpu_utilization 0.3\nnv_gpu_utilization 0.5\n", "vllm", mapping, now=0)
    assert s.gpu_utilization == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("engines: {vllm: {queue: [x]}}", "engines.vllm.queue: Extra inputs are not permitted"),
        ("engines: {vllm: {queue_depth: {metrics: []}}}", "engines.vllm.queue_depth.metrics"),
        (
            "engines: {vllm: {queue_depth: {metrics: [x], aggregate: median}}}",
            "engines.vllm.queue_depth.aggregate",
        ),
        ("engines: {vllm: {queue_depth: {metrics: ['not a name']}}}", "is not a Prometheus metric name"),
        ("gpu: {gpu_utilization: {metrics: [x], scale: 0}}", "gpu.gpu_utilization.scale: must be a finite"),
        ("engines: {VLLM: {}}", "engine name 'VLLM'"),
        ("version: 2", "version"),
        ("- a list", "top level must be a mapping"),
        ("engines: {vllm: [unclosed", "not valid YAML"),
    ],
)
def test_invalid_override_is_reported_with_its_path(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MetricMapError) as info:
        load_metric_map(path)
    assert info.value.source == str(path)
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_unreadable_override(tmp_path):
    with pytest.raises(MetricMapError, match="cannot read file"):
        load_metric_map(tmp_path / "missing.yaml")


def test_parse_metric_map_from_data():
    mapping = parse_metric_map({"engines": {"tei": {"queue_depth": ["te_queue_size"]}}})
    assert mapping.engines["tei"].queue_depth == GaugeSpec(metrics=("te_queue_size",), aggregate="sum")
