"""Launched replicas are watched like the registry's endpoints: probe targets, scrape targets and file-SD
groups list them with their model's engine, health check and labels; their probed health reaches EDS,
and the health of a replica no longer probed is forgotten."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from control_plane.config import parse_registry
from control_plane.config.schema import Registry
from control_plane.lifecycle.targets import launched_endpoints
from control_plane.metrics import ControlPlaneMetrics
from control_plane.observability.file_sd import FileSdWriter, backend_targets
from control_plane.runtime import HealthWiring, probe_targets
from control_plane.service import ControlPlane
from control_plane.state import ACTIVATOR_ENDPOINT_ID, Health, LaunchedReplica
from control_plane.telemetry.scraper import targets_from_registry
from control_plane.xds.cache import SnapshotCache

pytestmark = pytest.mark.unit

QWEN_REPLICA = LaunchedReplica("qwen-launched-9001", "127.0.0.1", 9001)


def _registry() -> Registry:
    return parse_registry(
        {
            "models": [
                {"id": "fixed", "engine": "tgi", "endpoints": [{"url": "http://127.0.0.1:8001"}]},
                {
                    "id": "qwen",
                    "engine": "vllm",
                    "launch": {"launcher": "simulator"},
                    "health": {"interval_s": 0.7, "timeout_s": 0.3},
                },
                {"id": "bge", "engine": "tei", "launch": {"launcher": "simulator"}},
            ]
        }
    )


def _launched(**extra: tuple[LaunchedReplica, ...]) -> dict[str, tuple[LaunchedReplica, ...]]:
    return {"qwen": (QWEN_REPLICA,), **extra}


def test_launched_endpoints_follow_the_registry_order_and_leave_out_unknown_models() -> None:
    v6 = LaunchedReplica("bge-launched-9002", "::1", 9002)
    stray = LaunchedReplica("gone-launched-1", "127.0.0.1", 1)
    found = launched_endpoints(
        _registry(), {"bge": (v6,), "qwen": (QWEN_REPLICA,), "gone": (stray,), "fixed": (stray,)}
    )
    assert [(e.model.id, e.id, e.url) for e in found] == [
        ("qwen", "qwen-launched-9001", "http://127.0.0.1:9001"),
        ("bge", "bge-launched-9002", "http://[::1]:9002"),
    ]


def test_file_sd_lists_launched_replicas_with_their_labels_and_rewrites_on_change(tmp_path: Path) -> None:
    registry = _registry()
    groups = backend_targets(registry, _launched())
    assert groups == [
        {"targets": ["127.0.0.1:8001"], "labels": {"model": "fixed", "endpoint": "fixed-0", "engine": "tgi"}},
        {
            "targets": ["127.0.0.1:9001"],
            "labels": {"model": "qwen", "endpoint": "qwen-launched-9001", "engine": "vllm"},
        },
    ]
    writer = FileSdWriter(tmp_path)
    assert writer.write(registry) is True
    assert len(json.loads(writer.backends_path.read_text())) == 1
    assert writer.write(registry, _launched()) is True  # a replica became ready
    assert writer.write(registry, _launched()) is False  # nothing changed: not rewritten
    assert [g["labels"]["endpoint"] for g in json.loads(writer.backends_path.read_text())] == [
        "fixed-0",
        "qwen-launched-9001",
    ]
    assert writer.write(registry, {}) is True  # unloaded: its target leaves
    assert len(json.loads(writer.backends_path.read_text())) == 1


def test_launched_replicas_are_scraped_and_probed_like_endpoints_of_their_engine() -> None:
    registry = _registry()
    scrape = {
        t.endpoint_id: (t.metrics_url, t.engine)
        for t in targets_from_registry(registry, launched=_launched())
    }
    assert scrape == {
        "fixed-0": ("http://127.0.0.1:8001/metrics", "tgi"),
        "qwen-launched-9001": ("http://127.0.0.1:9001/metrics", "vllm"),
    }
    probes = {t.endpoint_id: t for t in probe_targets(registry, _launched())}
    assert set(probes) == {"fixed-0", "qwen-launched-9001"}
    replica = probes["qwen-launched-9001"]
    assert replica.base_url == "http://127.0.0.1:9001" and replica.model.id == "qwen"
    assert replica.check.interval_s == 0.7  # the model's own health check
    assert {t.endpoint_id for t in probe_targets(registry)} == {"fixed-0"}


def _plane(registry: Registry) -> ControlPlane:
    return ControlPlane(
        registry, cache=SnapshotCache(), metrics=ControlPlaneMetrics.create(), resolver=lambda host: host
    )


def _endpoints(plane: ControlPlane, model_id: str) -> dict[str, Health]:
    model = next(m for m in plane.state.models if m.id == model_id)
    return {e.id: e.health for e in model.endpoints}


def test_a_launched_replicas_probed_health_reaches_eds_and_listeners_hear_of_changes() -> None:
    plane = _plane(_registry())
    plane.set_activator(("127.0.0.1", 7000))
    heard: list[dict[str, Any]] = []
    plane.add_launched_listener(lambda: heard.append(dict(plane.inputs.launched)))
    assert _endpoints(plane, "qwen") == {ACTIVATOR_ENDPOINT_ID: Health.UNKNOWN}
    plane.set_launched("qwen", (QWEN_REPLICA,))
    assert _endpoints(plane, "qwen") == {QWEN_REPLICA.id: Health.UNKNOWN}
    plane.set_health(QWEN_REPLICA.id, Health.UNHEALTHY)
    assert _endpoints(plane, "qwen") == {QWEN_REPLICA.id: Health.UNHEALTHY}
    plane.set_launched("qwen", (QWEN_REPLICA,))  # no change: no listener call
    plane.set_launched("qwen", ())
    assert _endpoints(plane, "qwen") == {ACTIVATOR_ENDPOINT_ID: Health.UNKNOWN}
    assert heard == [{"qwen": (QWEN_REPLICA,)}, {}]


def test_health_wiring_probes_launched_replicas_and_forgets_the_health_of_gone_ones() -> None:
    async def main() -> None:
        plane = _plane(_registry())
        wiring = HealthWiring(plane, ControlPlaneMetrics.create())
        plane.add_launched_listener(wiring.launched_changed)
        try:
            await wiring.follow(plane.registry)
            assert wiring.prober.status("fixed-0") is not None
            assert wiring.prober.status(QWEN_REPLICA.id) is None
            plane.set_launched("qwen", (QWEN_REPLICA,))
            for _ in range(100):  # the listener follows in a task
                if wiring.prober.status(QWEN_REPLICA.id) is not None:
                    break
                await asyncio.sleep(0.01)
            assert wiring.prober.status(QWEN_REPLICA.id) is not None
            plane.set_health(QWEN_REPLICA.id, Health.UNHEALTHY)
            plane.set_launched("qwen", ())
            for _ in range(100):
                if wiring.prober.status(QWEN_REPLICA.id) is None:
                    break
                await asyncio.sleep(0.01)
            assert wiring.prober.status(QWEN_REPLICA.id) is None
            assert QWEN_REPLICA.id not in plane.inputs.health
            # Started again on the same port (same id): not marked down by its predecessor's verdict.
            plane.set_launched("qwen", (QWEN_REPLICA,))
            assert _endpoints(plane, "qwen") == {QWEN_REPLICA.id: Health.UNKNOWN}
        finally:
            await wiring.close()

    asyncio.run(main())
