"""/metrics: Prometheus text that parses, with each engine's real metric names and DCGM telemetry."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.simulator.promtext import MetricsWriter
from backends.simulator.stats import Histogram

pytestmark = pytest.mark.unit

CHAT = {"model": "qwen2", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}

# Names as written on the wire (the parser strips counters' ``_total`` from family names).
EXPECTED: dict[str, dict[str, str]] = {
    "tgi": {
        "tgi_queue_size": "gauge",
        "tgi_batch_current_size": "gauge",
        "tgi_batch_current_max_tokens": "gauge",
        "tgi_request_count": "counter",
        "tgi_request_success": "counter",
        "tgi_request_failure": "counter",
        "tgi_request_duration": "histogram",
        "tgi_request_queue_duration": "histogram",
        "tgi_request_inference_duration": "histogram",
        "tgi_request_mean_time_per_token_duration": "histogram",
        "tgi_request_input_length": "histogram",
        "tgi_request_generated_tokens": "histogram",
    },
    "vllm": {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:gpu_cache_usage_perc": "gauge",
        "vllm:prompt_tokens_total": "counter",
        "vllm:generation_tokens_total": "counter",
        "vllm:request_success_total": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:time_per_output_token_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
    },
    "sglang": {
        "sglang:num_queue_reqs": "gauge",
        "sglang:num_running_reqs": "gauge",
        "sglang:token_usage": "gauge",
        "sglang:prompt_tokens_total": "counter",
        "sglang:generation_tokens_total": "counter",
        "sglang:time_to_first_token_seconds": "histogram",
        "sglang:e2e_request_latency_seconds": "histogram",
    },
    "tei": {
        "te_request_count": "counter",
        "te_request_success": "counter",
        "te_queue_size": "gauge",
        "te_request_duration": "histogram",
    },
}
DCGM = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE")


def _type_lines(text: str) -> dict[str, str]:
    return {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}


def _samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


@pytest.mark.parametrize("engine", ["tgi", "vllm", "sglang", "tei"])
def test_metrics_parse_with_real_names(sim, engine):
    async def main():
        async with sim(engine) as s, httpx.AsyncClient(base_url=s.url) as c:
            for _ in range(2):
                if engine == "tei":
                    assert (await c.post("/embed", json={"inputs": "hello"})).status_code == 200
                else:
                    assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
            r = await c.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            return r.text

    text = asyncio.run(main())
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses
    types = _type_lines(text)
    for name, kind in EXPECTED[engine].items():
        assert types.get(name) == kind, name
        assert f"# HELP {name} " in text
    for name in DCGM:
        assert types[name] == "gauge"
    samples = _samples(text)
    (util,) = samples["DCGM_FI_DEV_GPU_UTIL"]
    assert set(util.labels) >= {"gpu", "UUID", "modelName", "Hostname"}
    assert util.labels["gpu"] == "0" and util.labels["UUID"].startswith("GPU-")
    used = samples["DCGM_FI_DEV_FB_USED"][0].value
    free = samples["DCGM_FI_DEV_FB_FREE"][0].value
    assert used + free == 24 * 1024 and used > 0

    duration = {
        "tgi": "tgi_request_duration",
        "vllm": "vllm:e2e_request_latency_seconds",
        "sglang": "sglang:e2e_request_latency_seconds",
        "tei": "te_request_duration",
    }[engine]
    assert samples[f"{duration}_count"][0].value == 2
    buckets = samples[f"{duration}_bucket"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 2
    values = [b.value for b in buckets]
    assert values == sorted(values)
    if engine == "vllm":
        assert families["vllm:prompt_tokens"].samples[0].labels == {"model_name": "qwen2"}
        success = {x.labels["finished_reason"]: x.value for x in samples["vllm:request_success_total"]}
        assert success["length"] == 2
        assert samples["vllm:generation_tokens_total"][0].value == 6
    if engine == "tgi":
        assert samples["tgi_request_count_total"][0].value == 2  # the parser appends _total
        assert samples["tgi_request_generated_tokens_sum"][0].value == 6


def test_live_gauges_while_running(sim):
    async def main():
        async with (
            sim("vllm", decode_ms_per_token=20, kv_cache_tokens=100) as s,
            httpx.AsyncClient(base_url=s.url) as c,
        ):
            task = asyncio.create_task(
                c.post("/v1/completions", json={"prompt": "x" * 200, "max_tokens": 10})
            )
            await asyncio.sleep(0.08)
            samples = _samples((await c.get("/metrics")).text)
            await task
        assert samples["vllm:num_requests_running"][0].value == 1
        assert 0.5 < samples["vllm:kv_cache_usage_perc"][0].value <= 1.0
        assert samples["vllm:gpu_cache_usage_perc"][0].value == samples["vllm:kv_cache_usage_perc"][0].value
        assert samples["DCGM_FI_DEV_GPU_UTIL"][0].value > 0

    asyncio.run(main())


def test_writer_escapes_and_formats():
    w = MetricsWriter()
    w.gauge("g", "help with \\ and\nnewline", [({"a": 'q"uo\\te\n'}, 1.5)])
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    w.histogram("h", "a histogram", h, {"x": "y"})
    with pytest.raises(ValueError):
        w.gauge("g", "again", [])
    text = w.text()
    (g, hist) = list(text_string_to_metric_families(text))
    assert g.samples[0].labels == {"a": 'q"uo\\te\n'} and g.samples[0].value == 1.5
    by_name = {(s.name, s.labels.get("le")): s.value for s in hist.samples}
    assert by_name[("h_bucket", "0.1")] == 1
    assert by_name[("h_bucket", "1.0")] == 2
    assert by_name[("h_bucket", "+Inf")] == 3
    assert by_name[("h_count", None)] == 3
    assert by_name[("h_sum", None)] == pytest.approx(5.55)
