"""The optional NVML source: None without NVML, aggregated readings with it (faked here)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from control_plane.telemetry.gpu_nvml import read_nvml_gpu_signals
from control_plane.telemetry.signals import GpuSignals

pytestmark = pytest.mark.unit


class _NVMLError(Exception):
    pass


def _fake_pynvml(*, init_fails: bool = False) -> Any:
    module: Any = types.ModuleType("pynvml")
    module.NVMLError = _NVMLError
    module.shutdowns = 0

    def init() -> None:
        if init_fails:
            raise _NVMLError("NVML Shared Library Not Found")

    def shutdown() -> None:
        module.shutdowns += 1

    module.nvmlInit = init
    module.nvmlShutdown = shutdown
    module.nvmlDeviceGetCount = lambda: 2
    module.nvmlDeviceGetHandleByIndex = lambda index: index
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=[80, 40][h], memory=10)
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=[6, 2][h], free=[4, 8][h], total=10)
    return module


def test_none_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert read_nvml_gpu_signals() is None


def test_none_without_a_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_fails=True))
    assert read_nvml_gpu_signals() is None


def test_readings_are_aggregated(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    both = read_nvml_gpu_signals()
    assert both is not None and both.utilization == pytest.approx(0.6)
    assert (both.memory_used_bytes, both.memory_free_bytes) == (8.0, 12.0)
    assert read_nvml_gpu_signals([1]) == GpuSignals(
        utilization=0.4, memory_used_bytes=2.0, memory_free_bytes=8.0
    )
    assert read_nvml_gpu_signals([7]) is None
    assert fake.shutdowns == 3
