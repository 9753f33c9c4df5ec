"""Model activation (issue 11): what loading on demand adds beyond the engine's own load, and whether the
activator stays off the warm path.

One local stack (real Envoy, control plane, simulators, ``fast`` profile) with models of the same
simulated engine: ``bench-launched-<i>``, launched models (``launch: {launcher: simulator, load_time_s}``)
that the control plane starts on demand, and ``bench-static``, a simulator the stack starts itself. The
launched models' load times are spread over ``load_time_spread_s`` (1.00, 1.01, ... s): with one fixed
load time, an engine that starts equally fast every time becomes ready at the same phase of the
manager's readiness poll every time, and every run would measure the same part of its period.

1. **Cold requests.** With the launched model cold, one request (or a burst of ``burst_size`` at once)
   goes through Envoy. Meanwhile this bench watches the engine from its own side: the manager writes a
   ``starting: ... --port N`` line to the engine's log just before it spawns the process (seen here within
   ``poll_s``), and this bench polls that port's ``/health`` every ``poll_s`` until it answers 200. The
   engine's own load time is ``ready - spawn``. Activation overhead = the cold request's time (start to
   last byte) - the engine's own load time - the time the same request takes once the model is warm
   (through Envoy, straight to the replica). For a burst, the last answer counts and the warm reference
   is a warm burst of the same size. The manager's ``loaded_in_s`` (``GET /admin/lifecycle``) is kept
   too, as a second view. The model is unloaded (``POST /admin/models/{id}/unload``) between runs.
2. **Warm path.** ``wrk`` (same body shape, same connections, one run each) against the warm launched
   model and against the static one, with the control plane's CPU, the activator's held-requests gauge
   (sampled during the run) and its activation-wait count (before and after: requests that went through
   the activator) and ``x-served-by`` checked to be the replica.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from control_plane.devstack.procs import free_port
from control_plane.devstack.stack import LocalStack
from loadtest._common import (
    ProcessCpu,
    SectionResult,
    admin_headers,
    local_stack,
    run_load,
    wait_routable,
    wrk_binary,
)
from loadtest.bench_activation_report import render

STATIC = "bench-static"
LAUNCHED = "bench-launched-0"  # the warm path's model
PATH = "/v1/chat/completions"
HELD = "llm_gateway_activator_held_requests"
WAITS = "llm_gateway_activation_wait_seconds_count"
COLD_STARTS = "llm_gateway_model_cold_starts_total"
_STARTING = re.compile(r"starting: .* --port (\d+)")


@dataclass(frozen=True)
class ActivationSettings:
    runs: int = 10  # single cold requests
    bursts: int = 3  # bursts of burst_size cold requests at once
    burst_size: int = 20
    load_time_s: float = 1.0  # the simulated engine's load time (the first launched model's)
    load_time_spread_s: float = 0.1  # the launched models' load times: spread evenly over this
    models: int = 10  # launched models; run i uses model i % models
    warm_repeats: int = 5  # warm requests (or bursts) per cold run, for the warm reference
    warm_connections: int = 16
    warm_duration_s: float = 5.0
    warmup_s: float = 1.0
    poll_s: float = 0.002  # engine log and /health polling: the engine-side clock's resolution


def body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Wake up."}], "max_tokens": 2}


def launched_id(index: int) -> str:
    return f"bench-launched-{index}"


def load_time(settings: ActivationSettings, index: int) -> float:
    return round(settings.load_time_s + settings.load_time_spread_s * index / settings.models, 4)


def registry_doc(static_port: int, log_dir: Path, settings: ActivationSettings) -> dict[str, Any]:
    launched = [
        {
            "id": launched_id(i),
            "engine": "vllm",
            "launch": {
                "launcher": "simulator",
                "load_time_s": load_time(settings, i),
                "activation_timeout_s": 120,
            },
        }
        for i in range(settings.models)
    ]
    return {
        "gateway": {"expose_upstream_host": True},  # x-served-by: which upstream answered
        "lifecycle": {"log_dir": str(log_dir), "scan_interval_s": 3600},
        "models": [
            *launched,
            {"id": STATIC, "engine": "vllm", "endpoints": [{"url": f"http://127.0.0.1:{static_port}"}]},
        ],
    }


def metrics(stack: LocalStack) -> dict[str, float]:
    with urllib.request.urlopen(f"{stack.admin_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {HELD, WAITS, COLD_STARTS}
    return {
        s.name: float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in wanted
    }


class _Admin:
    def __init__(self, session: aiohttp.ClientSession, stack: LocalStack, model: str) -> None:
        self.session, self.url, self.headers = session, stack.admin_url, admin_headers(stack)
        self.model = model

    async def status(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/admin/lifecycle", headers=self.headers) as response:
            response.raise_for_status()
            return dict((await response.json())["models"][self.model])

    async def unload(self) -> None:
        url = f"{self.url}/admin/models/{self.model}/unload"
        async with self.session.post(url, headers=self.headers) as response:
            response.raise_for_status()
            state = (await response.json())["state"]
        if state != "cold":
            raise RuntimeError(f"{self.model} is {state} after unload")


async def _engine_side(
    log_dir: Path, sizes: dict[Path, int], poll_s: float, timeout_s: float
) -> tuple[float, float]:
    """(spawn, ready) monotonic times of the next engine the manager starts, seen from the engine's side:
    its log's `starting` line (written just before the spawn), then its /health's first 200."""
    deadline = time.monotonic() + timeout_s
    port = spawn = None
    while port is None:
        if time.monotonic() > deadline:
            raise TimeoutError("no engine started")
        for path in log_dir.glob("*.log"):
            size = path.stat().st_size
            if size > sizes.get(path, 0):
                with path.open("rb") as handle:
                    handle.seek(sizes.get(path, 0))
                    match = _STARTING.search(handle.read().decode(errors="replace"))
                if match:
                    port, spawn = int(match.group(1)), time.monotonic()
                    break
        await asyncio.sleep(poll_s)
    assert spawn is not None
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as response:
                    if response.status == 200:
                        return spawn, time.monotonic()
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet
            await asyncio.sleep(poll_s)
    raise TimeoutError(f"the engine on port {port} never answered /health 200")


async def _burst(url: str, model: str, size: int) -> tuple[float, list[float], list[int], list[str]]:
    """`size` requests at once: (start, answer times, statuses, x-served-by), a fresh session each time."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:

        async def one() -> tuple[float, int, str]:
            async with session.post(f"{url}{PATH}", json=body(model)) as response:
                await response.read()
                return time.monotonic(), response.status, response.headers.get("x-served-by", "")

        started = time.monotonic()
        answers = await asyncio.gather(*(one() for _ in range(size)))
    return started, [a[0] for a in answers], [a[1] for a in answers], [a[2] for a in answers]


async def _wait_direct(url: str, model: str, replica: str, timeout_s: float = 30.0) -> None:
    """Until Envoy sends the model's requests to the replica itself (its EDS update applied)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, _, statuses, served = await _burst(url, model, 1)
        if statuses == [200] and served == [replica]:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"Envoy still not routing {model} to {replica}")


async def cold_run(stack: LocalStack, settings: ActivationSettings, size: int, index: int) -> dict[str, Any]:
    model = launched_id(index % settings.models)
    url, log_dir = stack.envoys[0].url, Path(stack.registry().lifecycle.log_dir or "")
    async with aiohttp.ClientSession() as session:
        admin = _Admin(session, stack, model)
        if (await admin.status())["state"] != "cold":
            await admin.unload()
        cold_starts = metrics(stack).get(COLD_STARTS, 0.0)
        sizes = {p: p.stat().st_size for p in log_dir.glob("*.log")}
        watcher = asyncio.create_task(_engine_side(log_dir, sizes, settings.poll_s, 120.0))
        started, answered, statuses, _ = await _burst(url, model, size)
        spawn, ready = await watcher
        status = await admin.status()
        replica = status["replicas"][0]["address"]
        await _wait_direct(url, model, replica)
        warm = []
        for _ in range(settings.warm_repeats):
            w_started, w_answered, w_statuses, w_served = await _burst(url, model, size)
            if set(w_statuses) != {200} or set(w_served) != {replica}:
                raise RuntimeError(f"warm requests not all 200 from {replica}: {w_statuses} {w_served}")
            warm.append(max(w_answered) - w_started)
        loads = metrics(stack).get(COLD_STARTS, 0.0) - cold_starts
        await admin.unload()
    total, engine, warm_s = max(answered) - started, ready - spawn, statistics.median(warm)
    return {
        "model": model,
        "load_time_s": load_time(settings, index % settings.models),
        "requests": size,
        "errors": sum(1 for s in statuses if s != 200),
        "loads": loads,
        "total_s": total,
        "first_answer_s": min(answered) - started,
        "engine_load_s": engine,
        "loaded_in_s": status["loaded_in_s"],
        "warm_s": warm_s,
        "overhead_s": total - engine - warm_s,
        "overhead_vs_manager_s": total - status["loaded_in_s"] - warm_s,
        "before_spawn_s": spawn - started,  # Envoy → activator → manager → spawn
        "after_ready_s": max(answered) - ready - warm_s,  # noticing readiness, forwarding
    }


def warm_path(stack: LocalStack, settings: ActivationSettings) -> dict[str, Any]:
    """wrk against the warm launched model and the static one; the activator must see none of it."""
    url = stack.envoys[0].url

    async def load_and_find_replica() -> str:
        async with aiohttp.ClientSession() as session:
            admin = _Admin(session, stack, LAUNCHED)
            url_load = f"{stack.admin_url}/admin/models/{LAUNCHED}/load"
            async with session.post(url_load, headers=admin.headers) as response:
                response.raise_for_status()
            replica = str((await admin.status())["replicas"][0]["address"])
            await _wait_direct(url, LAUNCHED, replica)
            await wait_routable(session, url, STATIC)
            return replica

    replica = asyncio.run(load_and_find_replica())
    cp_pid = stack.control_plane.pid if stack.control_plane else None
    rows = []
    for model in (LAUNCHED, STATIC):
        payload = json.dumps(body(model), separators=(",", ":"))
        run_load(f"{url}{PATH}", payload, settings.warm_connections, settings.warmup_s)
        before = metrics(stack)
        held_max, stop = [0.0], threading.Event()

        def sample(held_max: list[float] = held_max, stop: threading.Event = stop) -> None:
            while not stop.wait(0.2):
                held_max[0] = max(held_max[0], metrics(stack).get(HELD, 0.0))

        sampler = threading.Thread(target=sample, daemon=True)
        cpu = ProcessCpu({"control-plane": cp_pid})
        cpu.start()
        sampler.start()
        try:
            result = run_load(f"{url}{PATH}", payload, settings.warm_connections, settings.warm_duration_s)
        finally:
            stop.set()
            sampler.join(5)
        cores = cpu.stop()
        after = metrics(stack)
        _, _, statuses, served = asyncio.run(_burst(url, model, 3))
        rows.append(
            {
                "model": model,
                **asdict(result),
                "rps": result.rps,
                "control_plane_cores": cores["control-plane"],
                "held_max": max(held_max[0], after.get(HELD, 0.0)),
                "through_activator": after.get(WAITS, 0.0) - before.get(WAITS, 0.0),
                "x_served_by": sorted(set(served)),
                "statuses": sorted(set(statuses)),
            }
        )
    return {"replica": replica, "rows": rows}


def run(settings: ActivationSettings, keep_dir: Path | None = None) -> SectionResult:
    started = time.monotonic()
    client = "wrk" if wrk_binary() else "python (aiohttp)"
    with tempfile.TemporaryDirectory(prefix="llm-gw-activation-") as tmp:
        work = keep_dir or Path(tmp)
        doc = registry_doc(free_port(), work / "engine-logs", settings)
        with local_stack(doc, sim_profile="fast", keep_dir=work / "stack") as stack:

            async def ready() -> None:
                async with aiohttp.ClientSession() as session:
                    await wait_routable(session, stack.envoys[0].url, STATIC)

            asyncio.run(ready())
            singles = [asyncio.run(cold_run(stack, settings, 1, i)) for i in range(settings.runs)]
            bursts = [
                asyncio.run(cold_run(stack, settings, settings.burst_size, i)) for i in range(settings.bursts)
            ]
            warm = warm_path(stack, settings)
    load_times = (load_time(settings, 0), load_time(settings, settings.models - 1))
    markdown = render(
        singles, bursts, warm, settings, client, launched=LAUNCHED, static=STATIC, load_times=load_times
    )
    data = {
        "settings": asdict(settings),
        "client": client,
        "singles": singles,
        "bursts": bursts,
        "warm": warm,
    }
    return SectionResult("activation", "Model activation", markdown, data, time.monotonic() - started)
