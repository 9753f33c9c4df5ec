"""A real engine process (the simulator, through its launcher): started in its own process group, waited on
through its loading phase, stopped by process group; a failed start and a crash are reported with the log."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from control_plane.devstack.procs import free_port
from control_plane.lifecycle.launchers import SimulatorLauncher
from control_plane.lifecycle.process import EngineProcess, LaunchFailed
from control_plane.lifecycle.types import LaunchSpec, ModelKind

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 30.0  # generous: a loaded machine starts Python slowly


def chat_spec(**overrides: object) -> LaunchSpec:
    values: dict[str, object] = {
        "model_id": "qwen2",
        "served_name": "qwen2",
        "kind": ModelKind.CHAT,
        "port": free_port(),
        "memory_mb": 12_000,
    }
    values.update(overrides)
    return LaunchSpec(**values)  # type: ignore[arg-type]


def run_with(engine: EngineProcess, body: Callable[[], Awaitable[None]]) -> None:
    """Run `body` on a fresh loop, and stop the engine by its process group whatever happens."""

    async def main() -> None:
        try:
            await body()
        finally:
            await engine.stop(grace_s=5)

    asyncio.run(main())


def test_waits_through_loading_then_serves_and_stops(tmp_path: Path) -> None:
    spec = chat_spec()
    engine = EngineProcess(spec, SimulatorLauncher(load_time_s=1.0, profile="fast"), tmp_path / "logs")
    exits: list[int] = []
    engine.on_exit(lambda code, tail: exits.append(code))
    url = f"http://127.0.0.1:{spec.port}"

    async def body() -> None:
        started = time.monotonic()
        await engine.start()
        assert engine.running and engine.pid is not None and engine.returncode is None
        assert os.getpgid(engine.pid) == engine.pid  # its own process group
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            # The first answers, while the model "loads", are 503 (polled until the port listens).
            for _ in range(200):  # bounded: about 10 s
                try:
                    statuses.append((await client.get("/health")).status_code)
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            await engine.wait_ready(READY_TIMEOUT_S)
            assert time.monotonic() - started >= 1.0  # not before the load time
            assert statuses == [503]
            assert (await client.get("/health")).status_code == 200
            chat = await client.post(
                "/v1/chat/completions",
                json={"model": "qwen2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            assert chat.status_code == 200, chat.text
            metrics = (await client.get("/metrics")).text
            used = re.search(r"^DCGM_FI_DEV_FB_USED\{.*\} (\S+)$", metrics, re.MULTILINE)
            assert used is not None and float(used.group(1)) == 12_000  # the spec's memory_mb
        code = await engine.stop(grace_s=5)
        assert code == 0  # the simulator exits 0 on SIGTERM
        assert not engine.running
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
        await asyncio.sleep(0.1)
        assert exits == []  # stop() is not an exit of its own
        assert "starting:" in engine.log_path.read_text()
        assert engine.log_path.stat().st_mode & 0o777 == 0o600

    run_with(engine, body)


def test_engine_that_exits_at_once_fails_with_its_log(tmp_path: Path) -> None:
    # A bad argument: the simulator's argparse refuses it and exits 2, as a real engine refuses a bad flag.
    launcher = SimulatorLauncher(extra_args=["--profile", "no-such-profile"])
    engine = EngineProcess(chat_spec(), launcher, tmp_path / "logs")

    async def body() -> None:
        await engine.start()
        with pytest.raises(LaunchFailed) as info:
            await engine.wait_ready(READY_TIMEOUT_S)
        assert info.value.returncode == 2
        assert "exited with code 2 before it was ready" in info.value.reason
        assert "invalid choice: 'no-such-profile'" in info.value.log_tail
        assert engine.returncode == 2

    run_with(engine, body)


def test_executable_that_does_not_exist(tmp_path: Path) -> None:
    launcher = SimulatorLauncher(executable=str(tmp_path / "no-such-engine"))
    engine = EngineProcess(chat_spec(), launcher, tmp_path / "logs")

    async def body() -> None:
        with pytest.raises(LaunchFailed, match="cannot start") as info:
            await engine.start()
        assert "no-such-engine" in info.value.log_tail

    run_with(engine, body)


def test_not_ready_in_time_fails_with_the_last_health_answer(tmp_path: Path) -> None:
    engine = EngineProcess(chat_spec(), SimulatorLauncher(load_time_s=60), tmp_path / "logs")

    async def body() -> None:
        await engine.start()
        await asyncio.sleep(0)  # let it begin
        # Wait until it listens (503), then ask for readiness with a short timeout.
        for _ in range(200):
            try:
                await engine.wait_ready(0.2)
            except LaunchFailed as exc:
                if "HTTP 503" in exc.reason:
                    assert "not ready within 0.2s" in exc.reason
                    assert engine.running  # the caller decides to stop it
                    return
        pytest.fail("the engine never answered 503 while loading")

    run_with(engine, body)


def test_crash_is_reported_once_with_code_and_log(tmp_path: Path) -> None:
    engine = EngineProcess(chat_spec(), SimulatorLauncher(), tmp_path / "logs")
    reported: list[tuple[int, str]] = []
    done = asyncio.Event()

    async def on_exit(code: int, tail: str) -> None:  # an async callback is awaited
        reported.append((code, tail))
        await engine.stop(grace_s=1)  # what a manager does with a dead replica: returns at once
        done.set()

    engine.on_exit(on_exit)

    async def body() -> None:
        await engine.start()
        await engine.wait_ready(READY_TIMEOUT_S)
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.1)
        assert [code for code, _ in reported] == [-signal.SIGKILL]
        assert "starting:" in reported[0][1]  # the log's tail
        assert engine.returncode == -signal.SIGKILL and not engine.running
        with pytest.raises(LaunchFailed, match="killed by signal 9"):
            await engine.wait_ready(1)

    run_with(engine, body)


class WorkerForkingLauncher:
    """An engine that leaves a worker behind, as vLLM and TGI fork theirs: a shell starts a background
    `sleep` (its pid written to a file), then becomes the simulator."""

    name = "forking"

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file

    def engine(self, spec: LaunchSpec) -> str:
        return "vllm"

    def command(self, spec: LaunchSpec) -> list[str]:
        sim = SimulatorLauncher().command(spec)
        script = f'sleep 60 & echo $! > "{self.pid_file}"; exec "$@"'
        return ["sh", "-c", script, "sh", *sim]


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    spec = chat_spec()
    engine = EngineProcess(spec, WorkerForkingLauncher(pid_file), tmp_path / "logs")

    async def body() -> None:
        await engine.start()
        await engine.wait_ready(READY_TIMEOUT_S)
        worker = int(pid_file.read_text())
        assert os.getpgid(worker) == engine.pid  # the worker is in the engine's group
        await engine.stop(grace_s=5)
        for _ in range(100):  # bounded: 5 s for the kernel to end it (it is not our child to reap)
            if not alive(worker):
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"worker {worker} outlived stop()")

    run_with(engine, body)


def alive(pid: int) -> bool:
    """Running: a zombie waiting for an init that does not reap it counts as ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class TermIgnoringLauncher:
    """An engine that ignores SIGTERM (a hung shutdown): stop() must escalate to SIGKILL."""

    name = "stubborn"

    def engine(self, spec: LaunchSpec) -> str:
        return "vllm"

    def command(self, spec: LaunchSpec) -> list[str]:
        # The markers are computed, so the log's header line (the argv) does not already hold them.
        return ["sh", "-c", "trap '' TERM; echo trap-$((1+1)); sleep 60; echo end-$((2+2))"]


def test_stop_kills_after_the_grace_period(tmp_path: Path) -> None:
    engine = EngineProcess(chat_spec(), TermIgnoringLauncher(), tmp_path / "logs")

    async def body() -> None:
        await engine.start()
        for _ in range(100):  # bounded: until the shell has set its trap
            if "trap-2" in engine.log_tail():
                break
            await asyncio.sleep(0.05)
        assert await engine.stop(grace_s=0.5) == -signal.SIGKILL
        assert "trap-2" in engine.log_tail() and "end-4" not in engine.log_tail()

    run_with(engine, body)
