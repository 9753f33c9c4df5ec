"""``GET /metrics``: the engine's statistics under each real server's metric names, plus DCGM GPU
telemetry, in Prometheus text format 0.0.4."""

from __future__ import annotations

from aiohttp import web

from .config import EngineKind
from .context import ServerContext, get_context
from .engine import Engine
from .gpu import gpu_telemetry, gpu_uuid
from .promtext import CONTENT_TYPE, Labels, MetricsWriter

_TGI_FAILURE_KINDS = ("validation", "overloaded", "generation")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=render_metrics(get_context(request)).encode(), headers={"Content-Type": CONTENT_TYPE}
    )


def render_metrics(ctx: ServerContext) -> str:
    writer = MetricsWriter()
    kind = ctx.config.engine
    if kind is EngineKind.TGI:
        _tgi(writer, ctx.engine)
    elif kind is EngineKind.VLLM:
        _vllm(writer, ctx.engine)
    elif kind is EngineKind.SGLANG:
        _sglang(writer, ctx.engine)
    else:
        _tei(writer, ctx.engine)
    _dcgm(writer, ctx)
    return writer.text()


def _tgi(w: MetricsWriter, engine: Engine) -> None:
    s = engine.stats
    w.gauge("tgi_queue_size", "Current queue size", [({}, engine.queue_size)])
    w.gauge("tgi_batch_current_size", "Current batch size", [({}, engine.running)])
    w.gauge(
        "tgi_batch_current_max_tokens",
        "Maximum tokens for the current batch",
        [({}, engine.batch_max_tokens)],
    )
    w.counter("tgi_request_count", "Total number of requests", [({}, s.requests)])
    w.counter("tgi_request_success", "Number of successful requests", [({}, s.successes)])
    kinds = list(_TGI_FAILURE_KINDS) + sorted(k for k in s.failures if k not in _TGI_FAILURE_KINDS)
    w.counter(
        "tgi_request_failure", "Number of failed requests", [({"err": k}, s.failures[k]) for k in kinds]
    )
    w.histogram("tgi_request_duration", "Request duration", s.e2e)
    w.histogram("tgi_request_queue_duration", "Request queue duration", s.queue_time)
    w.histogram("tgi_request_inference_duration", "Request inference duration", s.inference_time)
    w.histogram(
        "tgi_request_mean_time_per_token_duration", "Mean time per token per request", s.time_per_output_token
    )
    w.histogram("tgi_request_input_length", "Input token length per request", s.input_length)
    w.histogram("tgi_request_generated_tokens", "Generated tokens per request", s.generated_length)


def _vllm(w: MetricsWriter, engine: Engine) -> None:
    s = engine.stats
    labels: Labels = {"model_name": engine.config.model_id}
    w.gauge(
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        [(labels, engine.running)],
    )
    w.gauge(
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        [(labels, engine.queue_size)],
    )
    usage = engine.kv_cache_usage
    w.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", [(labels, usage)])
    w.gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", [(labels, usage)])
    # vLLM v1's prefix-cache counters, in tokens (hit rate = hits / queries over a window).
    cache = engine.prefix_cache
    w.counter(
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
        [(labels, cache.queries)],
    )
    w.counter(
        "vllm:prefix_cache_hits_total",
        "Prefix cache hits, in terms of number of cached tokens.",
        [(labels, cache.hits)],
    )
    w.counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", [(labels, s.prompt_tokens)])
    w.counter(
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
        [(labels, s.generation_tokens)],
    )
    finished = {"stop": s.finished["stop"], "length": s.finished["length"], "abort": s.failures["cancelled"]}
    w.counter(
        "vllm:request_success_total",
        "Count of successfully processed requests.",
        [({**labels, "finished_reason": reason}, n) for reason, n in finished.items()],
    )
    w.histogram(
        "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.ttft, labels
    )
    w.histogram(
        "vllm:e2e_request_latency_seconds",
        "Histogram of end to end request latency in seconds.",
        s.e2e,
        labels,
    )
    w.histogram(
        "vllm:time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        s.time_per_output_token,
        labels,
    )
    w.histogram(
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        s.queue_time,
        labels,
    )
    w.histogram(
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        s.inference_time,
        labels,
    )
    w.histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", s.input_length, labels)
    w.histogram(
        "vllm:request_generation_tokens", "Number of generation tokens processed.", s.generated_length, labels
    )


def _sglang(w: MetricsWriter, engine: Engine) -> None:
    s = engine.stats
    labels: Labels = {"model_name": engine.config.model_id}
    w.gauge("sglang:num_running_reqs", "The number of running requests.", [(labels, engine.running)])
    w.gauge(
        "sglang:num_queue_reqs", "The number of requests in the waiting queue.", [(labels, engine.queue_size)]
    )
    w.gauge("sglang:token_usage", "The token usage.", [(labels, engine.kv_cache_usage)])
    w.gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", [(labels, engine.prefix_cache.hit_rate)])
    w.counter(
        "sglang:prompt_tokens_total", "Number of prefill tokens processed.", [(labels, s.prompt_tokens)]
    )
    w.counter(
        "sglang:generation_tokens_total",
        "Number of generation tokens processed.",
        [(labels, s.generation_tokens)],
    )
    w.counter("sglang:num_requests_total", "Number of requests processed.", [(labels, s.successes)])
    w.histogram(
        "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.ttft, labels
    )
    w.histogram(
        "sglang:e2e_request_latency_seconds",
        "Histogram of End-to-end request latency in seconds",
        s.e2e,
        labels,
    )
    w.histogram(
        "sglang:time_per_output_token_seconds",
        "Histogram of time per output token in seconds.",
        s.time_per_output_token,
        labels,
    )


def _tei(w: MetricsWriter, engine: Engine) -> None:
    s = engine.stats
    w.counter("te_request_count", "Total number of requests", [({}, s.requests)])
    w.counter("te_request_success", "Number of successful requests", [({}, s.successes)])
    w.counter(
        "te_request_failure",
        "Number of failed requests",
        [({"err": k}, n) for k, n in sorted(s.failures.items())],
    )
    w.gauge("te_queue_size", "Current queue size", [({}, engine.queue_size)])
    w.gauge("te_batch_current_size", "Current batch size", [({}, engine.running)])
    w.histogram("te_request_duration", "Request duration", s.e2e)
    w.histogram("te_request_queue_duration", "Request queue duration", s.queue_time)
    w.histogram("te_request_inference_duration", "Request inference duration", s.inference_time)
    w.histogram("te_request_input_length", "Input token length per request", s.input_length)


def _dcgm(w: MetricsWriter, ctx: ServerContext) -> None:
    telemetry = gpu_telemetry(ctx.engine)
    labels: Labels = {
        "gpu": "0",
        "UUID": gpu_uuid(ctx.config.endpoint_id),
        "device": "nvidia0",
        "modelName": ctx.config.gpu.model_name,
        "Hostname": ctx.config.endpoint_id,
    }
    w.gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", [(labels, telemetry.util_percent)])
    w.gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", [(labels, telemetry.fb_free_mib)])
    w.gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", [(labels, telemetry.fb_used_mib)])
