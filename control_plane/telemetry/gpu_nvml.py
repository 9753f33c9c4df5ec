"""Local GPU telemetry through NVML (package ``nvidia-ml-py``, module ``pynvml``), for a control plane that
runs on the GPU host itself. Optional: without the package, a driver or a GPU, it returns ``None``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

from control_plane.telemetry.signals import GpuSignals

log = logging.getLogger(__name__)


def read_nvml_gpu_signals(indices: Sequence[int] | None = None) -> GpuSignals | None:
    """Mean utilisation (0..1) and summed memory (bytes) of the local GPUs ``indices`` (default: all).

    Blocking (NVML calls take about a millisecond per GPU); from async code call it through
    ``asyncio.to_thread``. ``None`` when NVML is unavailable or no GPU matches.
    """
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return None
    # NVMLError: no driver, no GPU, no permission; AttributeError: an nvidia-ml-py without that call.
    errors: tuple[type[BaseException], ...] = (getattr(nvml, "NVMLError", OSError), OSError, AttributeError)
    try:
        nvml.nvmlInit()
    except errors as exc:
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        count = int(nvml.nvmlDeviceGetCount())
        wanted = range(count) if indices is None else [i for i in indices if 0 <= i < count]
        utilizations: list[float] = []
        used = free = 0.0
        for index in wanted:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            utilizations.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used += float(memory.used)
            free += float(memory.free)
    except errors as exc:
        log.debug("NVML query failed: %s", exc)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except errors as exc:
            log.debug("NVML shutdown failed: %s", exc)
    if not utilizations:
        return None
    return GpuSignals(
        utilization=sum(utilizations) / len(utilizations), memory_used_bytes=used, memory_free_bytes=free
    )
