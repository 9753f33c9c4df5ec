"""Golden files of the /metrics shape: names, types, help and label keys (not values) of the control
plane's metrics and of each simulated engine's, whose names must stay those of the real engines."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from backends.simulator.app import build_app, start_server
from backends.simulator.config import make_config
from control_plane.config import parse_registry
from control_plane.metrics import ControlPlaneMetrics
from control_plane.runtime import EndpointGauges
from control_plane.service import ControlPlane
from control_plane.state import Health
from control_plane.xds.cache import SnapshotCache

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "metrics"
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+\S+")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="(?:[^"\\]|\\.)*"')


def shape(text: str) -> str:
    """HELP/TYPE lines as they are; each sample reduced to its name and label keys; duplicates once."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            out.append(line)
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        keys = sorted(set(_LABEL.findall(match.group("labels") or "")) - {"le", "quantile"})
        entry = f"{match.group('name')}{{{','.join(keys)}}}"
        if entry not in out:
            out.append(entry)
    return "\n".join(out) + "\n"


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    actual = shape(text)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(actual)
    assert path.read_text() == actual, f"{name} differs; rerun with UPDATE_GOLDEN=1 if the change is intended"


def test_control_plane_metrics_shape() -> None:
    registry = parse_registry(
        {"models": [{"id": "m", "engine": "vllm", "endpoints": [{"url": "http://127.0.0.1:1"}]}]}
    )
    metrics = ControlPlaneMetrics.create()
    plane = ControlPlane(registry, cache=SnapshotCache(), metrics=metrics, resolver=lambda h: h)
    metrics.registry.register(EndpointGauges(plane))
    plane.set_health("m-0", Health.HEALTHY)
    # One sample of each labelled series, so that its label keys show.
    metrics.config_reloads.labels("success").inc()
    metrics.admin_actions.labels("model.disable").inc()
    metrics.probes.labels("m", "ok").inc()
    metrics.alert_notifications.labels("EndpointDown", "firing").inc()
    metrics.auto_actions.labels("drain").inc()
    metrics.snapshot_build_seconds.observe(0.001)
    check("control_plane.txt", generate_latest(metrics.registry).decode())


@pytest.mark.parametrize("engine", ["tgi", "vllm", "sglang", "tei"])
def test_simulated_engine_metrics_shape(engine: str) -> None:
    async def scrape() -> str:
        import aiohttp

        server = await start_server(
            build_app(make_config(engine, "m", "e0", profile="instant"), exit_process=lambda c: None)
        )
        try:
            async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as response:
                return await response.text()
        finally:
            await server.stop()

    check(f"simulator_{engine}.txt", asyncio.run(scrape()))
