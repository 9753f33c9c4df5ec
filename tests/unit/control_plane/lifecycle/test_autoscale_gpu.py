"""GPU utilisation as an autoscaling signal, and the desired replica count of models with fixed endpoints.

- The policy adds a replica when the replicas' mean GPU utilisation stays above `target_gpu_utilization`,
  and removes one only when the same work would stay within target on one replica fewer.
- The signal reader takes DCGM_FI_DEV_GPU_UTIL from each endpoint's real /metrics answer over HTTP (the
  simulator's format) and averages it.
- `EndpointScaling` computes, for a model with `endpoints` and a `scaling` section, the count its routable
  endpoints' telemetry asks for, exports it as `llm_gateway_model_desired_replicas` (the launched models'
  metric), leaves unhealthy endpoints out of the ready count, exports the listed count for a model without
  `scaling`, and drops a removed model's series.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from control_plane.config.lifecycle import LaunchSettings
from control_plane.config.schema import Registry
from control_plane.lifecycle.autoscale import QueueDepthPolicy, ReplicaSignalReader, ScalingSignals
from control_plane.lifecycle.external import EndpointScaling
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.state import Health, StateInputs, build_state
from control_plane.telemetry.scraper import TelemetryScraper

pytestmark = pytest.mark.unit


def gpu_launch(**autoscale: Any) -> LaunchSettings:
    targets = {
        "target_queue_depth": None,
        "target_gpu_utilization": 0.7,
        "scale_up_after_s": 5,
        "scale_down_cooldown_s": 10,
        **autoscale,
    }
    return LaunchSettings(min_replicas=1, max_replicas=3, autoscale=targets)


def _run(settings: LaunchSettings, replicas: int, seconds: int, **signals: Any) -> list[int]:
    policy, history = QueueDepthPolicy(), []
    for now in range(1, seconds + 1):
        reading = ScalingSignals(at=now, ready=replicas, **signals)
        replicas = policy.desired("m", reading, settings)
        history.append(replicas)
    return history


def test_sustained_gpu_utilisation_above_target_adds_a_replica() -> None:
    history = _run(gpu_launch(), 1, 12, gpu_utilization=0.95)
    assert history[:5] == [1] * 5 and history[5] == 2  # 5 s above target: one more
    assert history[-1] == 3 and max(history) == 3  # and again, up to max_replicas
    assert set(_run(gpu_launch(), 1, 30, gpu_utilization=0.7)) == {1}  # at target: not above


def test_gpu_utilisation_scales_down_only_if_one_replica_fewer_stays_within_target() -> None:
    # Two replicas at 0.5: one would run at 1.0 > 0.7, so both stay; at 0.3 one would run at 0.6.
    assert set(_run(gpu_launch(), 2, 60, gpu_utilization=0.5)) == {2}
    history = _run(gpu_launch(), 2, 11, gpu_utilization=0.3)
    assert history[-2:] == [2, 1]
    # Unknown utilisation (no GPU metrics, no NVML) is no evidence either way.
    assert set(_run(gpu_launch(), 2, 60)) == {2}


def test_gpu_target_alone_is_a_target_and_is_bounded() -> None:
    LaunchSettings(autoscale={"target_queue_depth": None, "target_gpu_utilization": 0.8})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        LaunchSettings(autoscale={"target_gpu_utilization": 80})
    with pytest.raises(ValidationError, match="target_gpu_utilization"):
        LaunchSettings(autoscale={"target_queue_depth": None})


def _dcgm(util_percent: float, waiting: int = 0) -> str:
    return (
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="GPU-1"}} {util_percent}\n'
    )


@asynccontextmanager
async def engines(*utils: float) -> AsyncIterator[list[int]]:
    """One HTTP server per utilisation, answering /metrics as the simulator does; yields their ports."""
    runners, ports = [], []
    for util in utils:
        app = web.Application()

        async def metrics(request: web.Request, util: float = util) -> web.Response:
            return web.Response(text=_dcgm(util), content_type="text/plain")

        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    try:
        yield ports
    finally:
        for runner in runners:
            await runner.cleanup()


def test_the_reader_averages_dcgm_utilisation_from_the_replicas_metrics() -> None:
    async def run() -> ScalingSignals:
        async with engines(80, 40) as ports:
            reader = ReplicaSignalReader(TelemetryScraper(timeout_s=2), lambda a: 3, time.monotonic)
            try:
                return await reader.read("vllm", [f"127.0.0.1:{p}" for p in ports], loading=0, held=1)
            finally:
                await reader.close()

    signals = asyncio.run(run())
    assert signals.gpu_utilization == pytest.approx(0.6)
    assert signals.ready == 2 and signals.in_flight == 7 and signals.queue_depth == 0


def _registry(ports: list[int], **scaling: Any) -> Registry:
    with_scaling = {
        "id": "ext",
        "engine": "vllm",
        "endpoints": [{"url": f"http://127.0.0.1:{p}"} for p in ports],
        "scaling": {"min_replicas": 1, "max_replicas": 4, **scaling},
    }
    plain = {"id": "plain", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:9"}] * 2}
    return Registry.model_validate({"models": [with_scaling, plain]})


def _gauge(metrics: LifecycleMetrics, model_id: str) -> float | None:
    for metric in metrics.desired_replicas.collect():
        for sample in metric.samples:
            if sample.labels.get("model") == model_id:
                return float(sample.value)
    return None


def test_endpoint_models_get_a_desired_count_from_their_telemetry() -> None:
    asyncio.run(_endpoint_models())


async def _endpoint_models() -> None:
    metrics = LifecycleMetrics.create(CollectorRegistry())
    reader = ReplicaSignalReader(TelemetryScraper(timeout_s=2), lambda a: 0, time.monotonic)
    scaling = EndpointScaling(reader, metrics)
    autoscale = {"target_queue_depth": None, "target_gpu_utilization": 0.5, "scale_up_after_s": 0}
    async with engines(90, 70) as ports:
        registry = _registry(ports, autoscale=autoscale)
        state = build_state(registry, lambda host: host)
        await scaling.tick(registry, state)  # above target from now on
        assert _gauge(metrics, "ext") == 2
        await scaling.tick(registry, state)  # ... for scale_up_after_s (0): one more
        assert _gauge(metrics, "ext") == 3
        assert _gauge(metrics, "plain") == 2  # no `scaling`: the endpoints listed
        assert scaling.overview(registry)["ext"] == {
            "desired_replicas": 3,
            "endpoints": 2,
            "min_replicas": 1,
            "max_replicas": 4,
        }
        # An unhealthy endpoint is not a ready replica: one routable at 90 %, asked for 2 at once.
        inputs = StateInputs(health={"ext-1": Health.UNHEALTHY})
        fresh = EndpointScaling(reader, metrics)
        await fresh.tick(registry, build_state(registry, lambda host: host, inputs))
        await fresh.tick(registry, build_state(registry, lambda host: host, inputs))
        assert fresh.desired()["ext"] == 2
        # The model removed: its series goes.
        alone = Registry.model_validate({"models": [registry.models[1].model_dump()]})
        await scaling.tick(alone, build_state(alone, lambda host: host))
        assert _gauge(metrics, "ext") is None and _gauge(metrics, "plain") == 2
    await reader.close()


def test_scaling_is_refused_beside_launch_with_its_path() -> None:
    with pytest.raises(ValidationError) as caught:
        Registry.model_validate(
            {"models": [{"id": "m", "engine": "vllm", "launch": {}, "scaling": {"max_replicas": 2}}]}
        )
    assert "not in `scaling`" in str(caught.value) and caught.value.errors()[0]["loc"][:2] == ("models", 0)
    with pytest.raises(ValidationError) as bounds:
        Registry.model_validate(
            {
                "models": [
                    {
                        "id": "m",
                        "engine": "vllm",
                        "endpoints": [{"url": "http://127.0.0.1:9"}],
                        "scaling": {"min_replicas": 3, "max_replicas": 2},
                    }
                ]
            }
        )
    loc = ".".join(str(p) for p in bounds.value.errors()[0]["loc"])
    assert loc == "models.0.scaling" and "must not exceed" in str(bounds.value)
