"""A launched replica that the health prober marks unhealthy is replaced, through the real Envoy, control
plane and simulated engines, under tens of requests in flight: its /health answers 503 (the simulator's
control knob), the prober's verdict takes it out of Envoy's rotation, the manager drains and stops it and
starts a new one, and every request is answered by the other or the new replica. A replica that keeps
failing (past `max_restarts`) marks its model failed with the reason and an event; the next request loads
it again."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import StackFactory
from tests.support.gateway import admin_client, eventually, prometheus_value
from tests.support.registries import model

pytestmark = pytest.mark.integration

# A replica answering 503 fails its probes at once; one merely slow under the 30 clients on a loaded 2-core
# machine must not (a probe timing out is a failure too): generous timeout, three failures in a row.
PROBES = {"interval_s": 0.3, "timeout_s": 3.0, "unhealthy_threshold": 3, "healthy_threshold": 1, "jitter": 0}
CLIENTS = 30


def _doc(tmp_path: Path) -> dict[str, Any]:
    served = model(
        "served",
        "vllm",
        [],
        launch={
            "launcher": "simulator",
            "load_time_s": 0.5,
            "min_replicas": 2,
            "max_replicas": 2,
            # 8 tokens of 20 ms: each of the 30 clients keeps about one request in flight.
            "extra_args": ["--decode-ms-per-token", "20"],
            "restart": {"unhealthy_after_s": 1, "drain_s": 10, "backoff_s": 0.5, "max_restarts": 1},
        },
    )
    served.pop("endpoints")
    (tmp_path / "none").mkdir()
    lifecycle = {"model_dirs": [{"path": str(tmp_path / "none")}], "scan_interval_s": 3600}
    return {
        "gateway": {"expose_upstream_host": True},
        "lifecycle": lifecycle,
        "health": PROBES,
        "models": [served],
    }


def _view(admin: httpx.Client) -> dict[str, Any]:
    response = admin.get("/admin/models/served")
    response.raise_for_status()
    return dict(response.json())


def _ready(admin: httpx.Client) -> list[str]:
    return [r["address"] for r in _view(admin)["lifecycle"]["replicas"] if r["state"] == "ready"]


def _events(admin: httpx.Client) -> list[tuple[str, str]]:
    events = admin.get("/admin/lifecycle").json()["events"]
    return [(e["event"], e["detail"]) for e in reversed(events) if e["model"] == "served"]


def _unhealthy(address: str) -> None:
    """The replica's /health answers 503 from now on; it still serves requests."""
    response = httpx.post(f"http://{address}/sim/control", json={"healthy": False}, timeout=5)
    response.raise_for_status()


def test_an_unhealthy_replica_is_replaced_under_load(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = make_stack(_doc(tmp_path))
    url, metrics = stack.envoys[0].url, f"{stack.admin_url}/metrics"
    with admin_client(stack) as admin:
        eventually(lambda: len(_ready(admin)) == 2, 30, "the minimum's two replicas")
        first, second = _ready(admin)

        stop = threading.Event()
        statuses: list[int] = []
        served_by: list[str] = []
        body = {"model": "served", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    response = http.post(f"{url}/v1/chat/completions", json=body)
                    statuses.append(response.status_code)
                    served_by.append(response.headers.get("x-served-by", ""))

        with ThreadPoolExecutor(CLIENTS) as pool:
            clients = [pool.submit(client) for _ in range(CLIENTS)]
            try:
                eventually(lambda: {first, second} <= set(served_by), 20, "both replicas serving")
                _unhealthy(first)
                seen: list[str] = []

                def replica_replaced() -> bool:
                    seen[:] = _ready(admin)  # one view: a second call could see another moment
                    return len(seen) == 2 and first not in seen

                eventually(replica_replaced, 60, "the unhealthy replica replaced")
                assert second in seen, (second, seen)  # only the unhealthy one was replaced
                (new,) = set(seen) - {second}
                served_after = len(served_by)
                eventually(lambda: new in served_by[served_after:], 20, "the new replica serving")
            finally:
                stop.set()
            for done in clients:
                done.result(60)
        # Every request answered, by the old, the other or the new replica; the test had them in flight.
        assert len(statuses) > 3 * CLIENTS and set(statuses) == {200}, sorted(set(statuses))
        names = [e for e, _ in _events(admin)]
        replaced = names[names.index("replica unhealthy") :]
        assert replaced[:3] == ["replica unhealthy", "replica restarting", "replica ready"], names
        with httpx.Client(timeout=10) as http:
            restarts = prometheus_value(
                http, metrics, "llm_gateway_model_replica_restarts_total", model="served", reason="unhealthy"
            )
        assert restarts == 1

        # Failing again within the window (max_restarts: 1): the model is failed, with the reason.
        _unhealthy(second)
        eventually(lambda: _view(admin)["state"] == "failed", 60, "the model failed")
        failed = _view(admin)["lifecycle"]
        assert "max_restarts 1" in failed["reason"] and "probed unhealthy" in failed["reason"], failed
        assert failed["replicas"] == []
        assert ("failed", failed["reason"]) in _events(admin)
        # The next request loads it again (the minimum would, 30 s later).
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200
        assert _view(admin)["state"] == "ready"
