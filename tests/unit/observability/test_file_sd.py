"""File-SD targets of the model servers: pure groups from the registry, atomic writes only on change."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from control_plane.config.loader import parse_registry
from control_plane.config.schema import Registry
from control_plane.observability.file_sd import (
    BACKENDS_FILE,
    GPU_FILE,
    FileSdWriter,
    backend_targets,
    gpu_targets,
    render_groups,
)

pytestmark = pytest.mark.unit


def make_registry(*models: dict[str, Any]) -> Registry:
    return parse_registry({"models": list(models), "allow_empty": not models}, "test")


QWEN = {
    "id": "qwen2",
    "engine": "tgi",
    "endpoints": [
        {"id": "qwen2-a", "url": "http://127.0.0.1:8101"},
        {"url": "http://10.0.0.7:8000", "gpu_metrics_url": "http://10.0.0.7:9400/metrics"},
    ],
}
LLAMA = {
    "id": "meta/llama-3.1",
    "engine": "vllm",
    "enabled": False,
    "endpoints": [
        {
            "id": "llama-0",
            "url": "http://gpu-host.internal:8000",
            "gpu_metrics_url": "https://dcgm.internal:9400/gpu/metrics?gpu=1&format=text",
        }
    ],
}


def test_one_group_per_endpoint_with_model_endpoint_engine_labels() -> None:
    groups = backend_targets(make_registry(QWEN, LLAMA))
    assert groups == [
        {"targets": ["127.0.0.1:8101"], "labels": {"model": "qwen2", "endpoint": "qwen2-a", "engine": "tgi"}},
        {"targets": ["10.0.0.7:8000"], "labels": {"model": "qwen2", "endpoint": "qwen2-1", "engine": "tgi"}},
        # disabled models are still scraped; host names are kept for Prometheus to resolve
        {
            "targets": ["gpu-host.internal:8000"],
            "labels": {"model": "meta/llama-3.1", "endpoint": "llama-0", "engine": "vllm"},
        },
    ]


def test_no_models_no_groups() -> None:
    assert backend_targets(make_registry()) == []
    assert gpu_targets(make_registry()) == []
    assert render_groups([]) == "[]\n"


def test_ipv6_hosts_are_bracketed() -> None:
    registry = make_registry({"id": "m", "engine": "vllm", "endpoints": [{"url": "http://[::1]:8000"}]})
    assert backend_targets(registry)[0]["targets"] == ["[::1]:8000"]


def test_gpu_targets_only_for_endpoints_with_a_dcgm_exporter() -> None:
    groups = gpu_targets(make_registry(QWEN, LLAMA))
    assert groups == [
        {
            "targets": ["10.0.0.7:9400"],
            "labels": {
                "model": "qwen2",
                "endpoint": "qwen2-1",
                "engine": "tgi",
                "__metrics_path__": "/metrics",
                "__scheme__": "http",
            },
        },
        {
            "targets": ["dcgm.internal:9400"],
            "labels": {
                "model": "meta/llama-3.1",
                "endpoint": "llama-0",
                "engine": "vllm",
                "__metrics_path__": "/gpu/metrics",
                "__scheme__": "https",
                "__param_gpu": "1",
                "__param_format": "text",
            },
        },
    ]


def test_gpu_target_without_port_or_path_gets_the_scheme_defaults() -> None:
    registry = make_registry(
        {
            "id": "m",
            "engine": "vllm",
            "endpoints": [{"url": "http://10.0.0.1:8000", "gpu_metrics_url": "http://dcgm.internal"}],
        }
    )
    [group] = gpu_targets(registry)
    assert group["targets"] == ["dcgm.internal:80"]
    assert group["labels"]["__metrics_path__"] == "/metrics"


def test_rendered_json_is_stable_and_parses_back() -> None:
    groups = backend_targets(make_registry(QWEN, LLAMA))
    text = render_groups(groups)
    assert text == render_groups(backend_targets(make_registry(QWEN, LLAMA)))
    assert text.endswith("\n")
    assert json.loads(text) == groups


def test_writer_writes_both_files_and_only_when_changed(tmp_path: Path) -> None:
    directory = tmp_path / "targets"
    writer = FileSdWriter(directory)
    assert writer.write(make_registry(QWEN)) is True
    backends, gpu = directory / BACKENDS_FILE, directory / GPU_FILE
    assert json.loads(backends.read_text()) == backend_targets(make_registry(QWEN))
    assert json.loads(gpu.read_text()) == gpu_targets(make_registry(QWEN))

    stamp = backends.stat().st_mtime_ns, gpu.stat().st_mtime_ns
    inode = backends.stat().st_ino
    assert writer.write(make_registry(QWEN)) is False
    assert (backends.stat().st_mtime_ns, gpu.stat().st_mtime_ns) == stamp
    assert backends.stat().st_ino == inode  # not even rewritten in place

    assert writer.write(make_registry(QWEN, LLAMA)) is True
    assert [g["labels"]["endpoint"] for g in json.loads(backends.read_text())] == [
        "qwen2-a",
        "qwen2-1",
        "llama-0",
    ]
    # no temporary file is left behind
    assert sorted(p.name for p in directory.iterdir()) == [BACKENDS_FILE, GPU_FILE]


def test_writer_replaces_by_rename(tmp_path: Path) -> None:
    """Prometheus never sees a half-written file: the new content arrives as a new inode by rename."""
    writer = FileSdWriter(tmp_path)
    writer.write(make_registry(QWEN))
    before = (tmp_path / BACKENDS_FILE).stat().st_ino
    writer.write(make_registry(LLAMA))
    assert (tmp_path / BACKENDS_FILE).stat().st_ino != before


def test_writer_with_no_models_writes_empty_lists(tmp_path: Path) -> None:
    writer = FileSdWriter(tmp_path / "a" / "b")
    assert writer.write(make_registry()) is True
    assert writer.backends_path.read_text() == "[]\n"
    assert writer.gpu_path.read_text() == "[]\n"


def test_writer_rewrites_a_file_changed_by_someone_else(tmp_path: Path) -> None:
    writer = FileSdWriter(tmp_path)
    writer.write(make_registry(QWEN))
    (tmp_path / BACKENDS_FILE).write_text("garbage")
    assert writer.write(make_registry(QWEN)) is True
    assert json.loads((tmp_path / BACKENDS_FILE).read_text()) == backend_targets(make_registry(QWEN))


def test_writer_cleans_up_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = FileSdWriter(tmp_path)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        writer.write(make_registry(QWEN))
    assert list(tmp_path.iterdir()) == []
