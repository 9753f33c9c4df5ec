"""`make run` itself (`python -m control_plane devstack`): two stacks side by side on free ports from the same
registry, the admin token printed only when generated and never written to a log, private state
directories, a SIGKILLed Envoy restarted by the supervisor, and Ctrl-C (SIGINT) stopping every process."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from control_plane.devstack.procs import free_port
from control_plane.envoy_bootstrap import REPO_ROOT
from tests.support.gateway import chat, eventually
from tests.support.registries import model, registry, write

pytestmark = pytest.mark.integration

CHOSEN_TOKEN = "operator-chosen-admin-token-42"


@dataclass
class DevStack:
    process: subprocess.Popen[bytes]
    state_dir: Path
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def field_line(self, label: str) -> str:
        match = re.search(rf"^  {label}\s+(.*)$", self.text(), re.MULTILINE)
        assert match, f"no {label!r} in the banner:\n{self.text()}"
        return match.group(1)

    def field(self, label: str) -> str:
        match = re.search(rf"^  {label}\s+(\S+)", self.text(), re.MULTILINE)
        assert match, f"no {label!r} in the banner:\n{self.text()}"
        return match.group(1)


def start(tmp_path: Path, name: str, config: Path, admin_token: str | None) -> DevStack:
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_TOKEN", "XDS_SECRET")}
    env["PROMETHEUS_BIN"] = "/nonexistent/prometheus"  # not needed here: keeps the test light
    if admin_token:
        env["ADMIN_TOKEN"] = admin_token
    output = tmp_path / f"{name}.out"
    state_dir = tmp_path / name
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "control_plane", "devstack", "--config", str(config), "--free-ports",
             "--state-dir", str(state_dir)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return DevStack(process, state_dir, output)


def pids_with(fragment: str) -> list[int]:
    """PIDs whose command line mentions `fragment` (a path unique to one stack)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[tuple[DevStack, DevStack]]:
    # The registry's own simulator ports are taken: the stacks must move theirs.
    ports = [free_port(), free_port()]
    config = write(tmp_path / "models.yaml", registry(model("qwen2", "tgi", ports)))
    blockers = []
    for port in ports:
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        blockers.append(blocker)
    a = start(tmp_path, "a", config, admin_token=None)
    b = start(tmp_path, "b", config, admin_token=CHOSEN_TOKEN)
    try:
        yield a, b
    finally:
        for stack in (a, b):
            if stack.process.poll() is None:
                os.kill(stack.process.pid, signal.SIGINT)
                try:
                    stack.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    stack.process.kill()
        for blocker in blockers:
            blocker.close()


def test_two_stacks_side_by_side_supervised_and_stopped_by_ctrl_c(stacks: tuple[DevStack, DevStack]) -> None:
    a, b = stacks
    for stack in (a, b):
        eventually(lambda s=stack: "LLM gateway is up" in s.text() or s.process.poll() is not None, 120)
        assert "LLM gateway is up" in stack.text(), stack.text()
    urls = [s.field("OpenAI-style API").removesuffix("/v1") for s in (a, b)]
    assert urls[0] != urls[1]
    with httpx.Client(timeout=10) as client:
        for url in urls:
            eventually(lambda u=url: chat(client, u, "qwen2").status_code == 200, 30, "the gateway")

    # The generated token is printed; the operator's own never is, on the console or in any file.
    token = a.field("Admin token")
    assert f"export ADMIN_TOKEN={token}" in a.text()
    assert CHOSEN_TOKEN not in b.text() and "#token=" not in b.text()
    for path in b.state_dir.rglob("*"):
        if path.is_file() and path.name != "webhook-token":  # Alertmanager's credential file, 0600
            assert CHOSEN_TOKEN.encode() not in path.read_bytes(), path
    for stack in (a, b):
        assert stat.S_IMODE(stack.state_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((stack.state_dir / "logs").stat().st_mode) == 0o700
        for name in ("secrets/xds-secret", "envoy-gateway-0.yaml", "logs/control-plane-1.log"):
            assert stat.S_IMODE((stack.state_dir / name).stat().st_mode) == 0o600, name

    # A SIGKILLed Envoy comes back by itself, and says so.
    bootstrap = str(b.state_dir / "envoy-gateway-0.yaml")
    [envoy_pid] = pids_with(bootstrap)
    os.kill(envoy_pid, signal.SIGKILL)
    with httpx.Client(timeout=10) as client:
        eventually(lambda: "[supervisor] envoy-gateway-0 restarted" in b.text(), 60, "the restart")
        eventually(lambda: chat(client, urls[1], "qwen2").status_code == 200, 30, "the gateway back")
    assert "restarted" in (b.state_dir / "logs" / "supervisor.log").read_text()
    assert pids_with(bootstrap) not in ([], [envoy_pid])

    # Ctrl-C stops every process each stack started: no Envoy, control plane or simulator is left.
    sim_ports = [int(p) for s in (a, b) for p in re.findall(r"qwen2-\d :(\d+)", s.field_line("Simulators"))]
    assert len(sim_ports) == 4 and len(set(sim_ports)) == 4
    for stack in (a, b):
        os.kill(stack.process.pid, signal.SIGINT)
    for stack in (a, b):
        assert stack.process.wait(timeout=60) == 0
        assert pids_with(str(stack.state_dir)) == []
    deadline = time.monotonic() + 10
    while any(listening(p) for p in sim_ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(listening(p) for p in sim_ports)
