"""Prometheus exposition → EndpointSignals, on golden texts of each engine and of a DCGM exporter."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from control_plane.errors import GatewayError
from control_plane.telemetry.errors import MetricsParseError, UnknownEngineError
from control_plane.telemetry.metric_map import default_metric_map
from control_plane.telemetry.parse import gpu_signals_from_text, parse_exposition, signals_from_text
from control_plane.telemetry.signals import EndpointSignals, GpuSignals, HistogramTotals

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"
MIB = 1024 * 1024
MAP = default_metric_map()


def golden(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def test_tgi():
    s = signals_from_text(golden("tgi.prom"), "tgi", MAP, now=100.0)
    assert s.scraped_at == 100.0
    assert (s.queue_depth, s.running) == (7, 16)
    assert s.kv_cache_usage is None  # TGI does not export it
    assert s.gpu_utilization is None and s.gpu_memory_used_bytes is None
    assert s.histogram("e2e_seconds") == HistogramTotals("e2e_seconds", 1647.25, 1830)
    assert s.histogram("time_per_token_seconds") == HistogramTotals("time_per_token_seconds", 34.77, 1830)
    # One scrape gives totals, not means: means need two.
    assert s.e2e_seconds_mean is None and s.time_per_token_seconds_mean is None


def test_vllm_current_names_summed_and_averaged_over_engines():
    s = signals_from_text(golden("vllm_v1.prom"), "vllm", MAP, now=5.0)
    assert s.queue_depth == 5  # 3 + 2 (data-parallel engines: summed)
    assert s.running == 44
    assert s.kv_cache_usage == pytest.approx(0.65)  # mean of 0.75 and 0.55
    assert s.histogram("ttft_seconds") == HistogramTotals("ttft_seconds", 185.5, 1900)
    assert s.histogram("e2e_seconds") == HistogramTotals("e2e_seconds", 4560.0, 1900)
    # The newer inter-token histogram is preferred.
    assert s.histogram("time_per_token_seconds") == HistogramTotals("time_per_token_seconds", 3990.0, 190000)


def test_vllm_legacy_cache_name():
    s = signals_from_text(golden("vllm_legacy.prom"), "vllm", MAP, now=5.0)
    assert (s.queue_depth, s.running) == (0, 5)
    assert s.kv_cache_usage == pytest.approx(0.125)  # from vllm:gpu_cache_usage_perc
    assert s.histogram("time_per_token_seconds") == HistogramTotals("time_per_token_seconds", 60.0, 4000)
    assert s.histogram("ttft_seconds") is None


def test_vllm_prefers_the_current_cache_name_when_both_exist():
    text = (
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.9\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.3\n'
        'vllm:num_requests_waiting{model_name="m"} 1\n'
    )
    assert signals_from_text(text, "vllm", MAP, now=0).kv_cache_usage == pytest.approx(0.3)


def test_sglang():
    s = signals_from_text(golden("sglang.prom"), "sglang", MAP, now=1.0)
    assert (s.queue_depth, s.running) == (12, 31)
    assert s.kv_cache_usage == pytest.approx(0.91)
    assert s.histogram("e2e_seconds") == HistogramTotals("e2e_seconds", 5120.0, 2048)


def test_tei():
    s = signals_from_text(golden("tei.prom"), "tei", MAP, now=1.0)
    assert (s.queue_depth, s.running, s.kv_cache_usage) == (4, 32, None)


def test_dcgm_exporter_units_and_aggregation():
    gpu = gpu_signals_from_text(golden("dcgm.prom"), MAP)
    assert gpu.utilization == pytest.approx(0.65)  # mean of 90 % and 40 %
    assert gpu.memory_used_bytes == (73000 + 77000) * MIB
    assert gpu.memory_free_bytes == (8192 + 4096) * MIB


def test_dcgm_label_filter_keeps_one_gpu():
    gpu = gpu_signals_from_text(golden("dcgm.prom"), MAP, labels={"gpu": "1"})
    assert gpu == GpuSignals(utilization=0.4, memory_used_bytes=77000 * MIB, memory_free_bytes=4096 * MIB)
    assert gpu_signals_from_text(golden("dcgm.prom"), MAP, labels={"gpu": "9"}) == GpuSignals()


def test_gpu_signals_on_the_engines_own_metrics():
    text = golden("vllm_v1.prom") + golden("dcgm.prom")
    s = signals_from_text(text, "vllm", MAP, now=0)
    assert s.gpu_utilization == pytest.approx(0.65)
    assert s.gpu_memory_free_bytes == 12288 * MIB
    assert signals_from_text(text, "vllm", MAP, now=0, gpu=False).gpu_utilization is None
    only_gpu0 = signals_from_text(text, "vllm", MAP, now=0, gpu_labels={"gpu": "0"})
    assert only_gpu0.gpu_utilization == pytest.approx(0.9)


def _tgi(duration_sum: float, duration_count: int, tpt_sum: float = 0.0) -> str:
    return (
        "# TYPE tgi_queue_size gauge\ntgi_queue_size 0\n"
        "# TYPE tgi_request_duration histogram\n"
        f'tgi_request_duration_bucket{{le="+Inf"}} {duration_count}\n'
        f"tgi_request_duration_sum {duration_sum}\ntgi_request_duration_count {duration_count}\n"
        "# TYPE tgi_request_mean_time_per_token_duration histogram\n"
        f'tgi_request_mean_time_per_token_duration_bucket{{le="+Inf"}} {duration_count}\n'
        f"tgi_request_mean_time_per_token_duration_sum {tpt_sum}\n"
        f"tgi_request_mean_time_per_token_duration_count {duration_count}\n"
    )


def test_mean_latency_from_histogram_deltas():
    first = signals_from_text(_tgi(10.0, 10, 0.2), "tgi", MAP, now=0)
    second = signals_from_text(_tgi(16.0, 13, 0.35), "tgi", MAP, now=2, previous=first)
    assert second.e2e_seconds_mean == pytest.approx(2.0)  # 6 s over 3 requests
    assert second.time_per_token_seconds_mean == pytest.approx(0.05)
    # No request finished since: the previous means are carried.
    third = signals_from_text(_tgi(16.0, 13, 0.35), "tgi", MAP, now=4, previous=second)
    assert third.e2e_seconds_mean == pytest.approx(2.0)
    # Counters went back (server restarted): unknown until the next scrape.
    fourth = signals_from_text(_tgi(1.0, 1, 0.01), "tgi", MAP, now=6, previous=third)
    assert fourth.e2e_seconds_mean is None
    fifth = signals_from_text(_tgi(2.5, 2, 0.03), "tgi", MAP, now=8, previous=fourth)
    assert fifth.e2e_seconds_mean == pytest.approx(1.5)


def test_nan_and_missing_samples_are_unknown():
    text = "tgi_queue_size NaN\ntgi_batch_current_size +Inf\n"
    s = signals_from_text(text, "tgi", MAP, now=0)
    assert s.queue_depth is None and s.running is None
    assert not s.has_load_signals
    empty = signals_from_text("", "vllm", MAP, now=0)
    assert empty == EndpointSignals(scraped_at=0)


def test_counters_renamed_by_the_parser_do_not_matter():
    # prometheus_client's parser files `x` of a counter family as sample `x_total`; gauges keep their name.
    samples = parse_exposition(golden("tgi.prom"))
    assert "tgi_request_count_total" in samples
    assert samples["tgi_queue_size"][0].value == 7


@pytest.mark.parametrize(
    "text",
    [
        "<html><body>502 Bad Gateway</body></html>",
        "tgi_queue_size abc\n",
        'tgi_queue_size{le="1" 3\n',
        "# TYPE tgi_queue_size\n",
        "\x00\x01\x02",
        '{"error": "not found"}',
    ],
)
def test_malformed_text_is_a_typed_error(text):
    with pytest.raises(MetricsParseError) as info:
        signals_from_text(text, "tgi", MAP, now=0)
    assert isinstance(info.value, GatewayError)


def test_unknown_engine():
    with pytest.raises(UnknownEngineError, match="llamacpp"):
        signals_from_text("", "llamacpp", MAP, now=0)


def test_signals_helpers():
    s = EndpointSignals(scraped_at=10.0, queue_depth=1)
    assert s.is_fresh(now=12.0, max_age_s=2.0)
    assert not s.is_fresh(now=12.5, max_age_s=2.0)
    assert s.age(11.5) == 1.5
    with_gpu = s.with_gpu(GpuSignals(utilization=0.5, memory_used_bytes=1.0, memory_free_bytes=2.0))
    assert with_gpu.gpu == GpuSignals(utilization=0.5, memory_used_bytes=1.0, memory_free_bytes=2.0)
    assert with_gpu.with_gpu(None) == s
    assert replace(s, queue_depth=None).has_load_signals is False
    hash(with_gpu)  # frozen and hashable
