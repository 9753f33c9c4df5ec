"""Fake GPU telemetry derived from the engine's load (exported under DCGM exporter names)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from .engine import Engine


@dataclass(frozen=True, slots=True)
class GpuTelemetry:
    util_percent: float
    fb_used_mib: int
    fb_free_mib: int


def gpu_uuid(endpoint_id: str) -> str:
    """A stable per-endpoint GPU UUID, formatted like nvidia-smi's."""
    return "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"sim-gpu/{endpoint_id}"))


def gpu_telemetry(engine: Engine) -> GpuTelemetry:
    """Utilisation = batch occupancy; memory = weights + the used share of the KV-cache pool."""
    gpu = engine.config.gpu
    if gpu.reserved_mib:
        used = min(gpu.total_mib, gpu.reserved_mib)  # reserved at load, whatever the load (--memory-mb)
    else:
        pool_mib = max(0.0, gpu.total_mib * gpu.kv_pool_fraction - gpu.weights_mib)
        used = min(gpu.total_mib, round(gpu.weights_mib + pool_mib * engine.kv_cache_usage))
    return GpuTelemetry(
        util_percent=round(100.0 * engine.batch_occupancy, 1),
        fb_used_mib=used,
        fb_free_mib=gpu.total_mib - used,
    )
