"""Health probing against real simulated model servers: up, down, hung, wrong model, thresholds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backends.simulator.app import build_app, start_server
from backends.simulator.config import make_config
from control_plane.config import HealthCheck, ModelConfig
from control_plane.health.prober import EndpointHealth, HealthProber, next_health
from control_plane.health.probes import ProbeResult, ProbeTarget, probe
from control_plane.state import Health

pytestmark = pytest.mark.unit

CHECK = HealthCheck(interval_s=0.1, timeout_s=0.3, unhealthy_threshold=2, healthy_threshold=2, jitter=0)


def target(engine: str, url: str, model_id: str = "m", **model: Any) -> ProbeTarget:
    return ProbeTarget("e0", url, ModelConfig(id=model_id, engine=engine, **model), CHECK)


async def simulator(engine: str, model_id: str = "m") -> tuple[Any, str]:
    config = make_config(engine=engine, model_id=model_id, endpoint_id="e0", profile="instant")
    server = await start_server(build_app(config, exit_process=lambda code: None))
    return server, server.url


@pytest.mark.parametrize("engine", ["tgi", "vllm", "sglang", "tei"])
def test_probe_checks_health_and_the_served_model(engine: str) -> None:
    async def main() -> None:
        runner, url = await simulator(engine, "m")
        import aiohttp

        async with aiohttp.ClientSession() as session:
            assert await probe(session, target(engine, url)) == ProbeResult(True)
            wrong = await probe(session, target(engine, url, model_id="other"))
            assert wrong.wrong_model and "serves m, expected other" in wrong.reason
            renamed = await probe(session, target(engine, url, model_id="other", served_model="m"))
            assert renamed.ok
            await session.post(f"{url}/sim/control", json={"healthy": False})
            sick = await probe(session, target(engine, url))
            assert not sick.ok and "answered 503" in sick.reason
        await runner.stop()

    asyncio.run(main())


def test_probe_of_a_dead_port_and_a_hung_server() -> None:
    async def main() -> None:
        import aiohttp

        from control_plane.devstack.procs import free_port

        async with aiohttp.ClientSession() as session:
            dead = await probe(session, target("vllm", f"http://127.0.0.1:{free_port()}"))
            assert not dead.ok and "unreachable" in dead.reason

            # Accepts connections, never answers.
            server = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            hung = await probe(session, target("vllm", f"http://127.0.0.1:{port}"))
            assert not hung.ok and "no answer within 0.3s" in hung.reason
            server.close()

    asyncio.run(main())


def test_state_machine_thresholds() -> None:
    t = target("vllm", "http://x")
    ok, fail, wrong = ProbeResult(True), ProbeResult(False, "x"), ProbeResult(False, "m", wrong_model=True)
    assert next_health(EndpointHealth(successes=1), ok, t) == Health.HEALTHY  # unknown → healthy at once
    assert next_health(EndpointHealth(Health.HEALTHY, failures=1), fail, t) == Health.HEALTHY
    assert next_health(EndpointHealth(Health.HEALTHY, failures=2), fail, t) == Health.UNHEALTHY
    assert next_health(EndpointHealth(Health.UNHEALTHY, successes=1), ok, t) == Health.UNHEALTHY
    assert next_health(EndpointHealth(Health.UNHEALTHY, successes=2), ok, t) == Health.HEALTHY
    assert next_health(EndpointHealth(Health.HEALTHY), wrong, t) == Health.UNHEALTHY


def test_prober_reports_transitions_as_they_happen() -> None:
    async def main() -> None:
        runner, url = await simulator("vllm")
        changes: list[tuple[str, Health, str]] = []
        prober = HealthProber(on_change=lambda e, h, r: changes.append((e, h, r)))
        await prober.update_targets([target("vllm", url)])
        for _ in range(50):
            if changes:
                break
            await asyncio.sleep(0.05)
        assert changes == [("e0", Health.HEALTHY, "")]
        await runner.stop()  # the server goes away
        for _ in range(50):
            if len(changes) > 1:
                break
            await asyncio.sleep(0.05)
        assert changes[1][:2] == ("e0", Health.UNHEALTHY)
        assert prober.status("e0").reason.startswith("unreachable")  # type: ignore[union-attr]
        await prober.update_targets([])
        assert prober.status("e0") is None
        await prober.close()

    asyncio.run(main())
