"""The local stack: simulated model servers for the registry's loopback endpoints, the control plane and
one or more Envoys, each a child process on loopback."""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.config.loader import load_registry
from control_plane.config.schema import ModelConfig, Registry
from control_plane.devstack.procs import ManagedProcess, free_port, http_ok, wait_until
from control_plane.envoy_bootstrap import REPO_ROOT, BootstrapParams, envoy_binary, render_bootstrap


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class EnvoyHandle:
    process: ManagedProcess
    node_id: str
    listen_port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@dataclass
class StackSettings:
    config_path: Path
    work_dir: Path
    xds_port: int = 0  # 0: pick one at first start, keep it across control-plane restarts
    admin_port: int = 0
    python: str = sys.executable
    sim_profile: str = "default"
    sim_extra_args: dict[str, list[str]] = field(default_factory=dict)  # endpoint id → extra CLI flags
    envoy_concurrency: int = 1
    envoy_log_level: str = "warning"
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    state_db: Path | None = None  # default: <work_dir>/state.db, kept across control-plane restarts
    file_sd_dir: Path | None = None  # default: <work_dir>/prometheus/targets (where Prometheus looks)
    prometheus_url: str | None = None  # gives the status page its latency charts


class LocalStack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.simulators: dict[str, ManagedProcess] = {}
        self.control_plane: ManagedProcess | None = None
        self.envoys: list[EnvoyHandle] = []
        self.xds_port = settings.xds_port
        self.admin_port = settings.admin_port
        self._cp_starts = 0

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def registry(self) -> Registry:
        return load_registry(self.settings.config_path)

    def _log(self, name: str) -> Path:
        return self.settings.work_dir / "logs" / f"{name}.log"

    # Simulated model servers
    def start_simulator(self, model: ModelConfig, index: int, wait: bool = True) -> ManagedProcess:
        endpoint = model.endpoints[index]
        endpoint_id = model.endpoint_id(index)
        argv = [
            self.settings.python,
            "-m",
            "backends.simulator",
            "--engine",
            model.engine.value,
            "--model-id",
            model.id,
            "--endpoint-id",
            endpoint_id,
            "--host",
            "127.0.0.1" if endpoint.host == "localhost" else endpoint.host,
            "--port",
            str(endpoint.port),
            "--profile",
            self.settings.sim_profile,
        ]
        for alias in model.aliases:
            argv += ["--served-name", alias]
        argv += self.settings.sim_extra_args.get(endpoint_id, [])
        old = self.simulators.get(endpoint_id)
        if old is not None:
            old.stop()
        process = ManagedProcess(
            f"sim-{endpoint_id}", argv, self._log(f"sim-{endpoint_id}"), cwd=REPO_ROOT
        ).start()
        self.simulators[endpoint_id] = process
        if wait:
            process.wait_for_line(r"^READY ", timeout_s=30)
        return process

    def start_simulators(self) -> None:
        """One simulator per loopback endpoint of the registry (remote endpoints are real servers)."""
        started = []
        for model in self.registry().models:
            for index, endpoint in enumerate(model.endpoints):
                if is_loopback(endpoint.host) and model.endpoint_id(index) not in self.simulators:
                    started.append(self.start_simulator(model, index, wait=False))
        for process in started:
            process.wait_for_line(r"^READY ", timeout_s=30)

    # Control plane
    def start_control_plane(self) -> ManagedProcess:
        self._cp_starts += 1
        argv = [
            self.settings.python,
            "-m",
            "control_plane",
            "serve",
            "--config",
            str(self.settings.config_path),
            "--xds-port",
            str(self.xds_port),
            "--admin-port",
            str(self.admin_port),
            "--state-db",
            str(self.settings.state_db or self.settings.work_dir / "state.db"),
            "--file-sd-dir",
            str(self.settings.file_sd_dir or self.settings.work_dir / "prometheus" / "targets"),
        ]
        log = self._log(f"control-plane-{self._cp_starts}")
        if self.settings.prometheus_url:
            argv += ["--prometheus-url", self.settings.prometheus_url]
        env = {**os.environ, "ADMIN_TOKEN": self.settings.admin_token}
        process = ManagedProcess("control-plane", argv, log, env=env, cwd=REPO_ROOT).start()
        match = process.wait_for_line(r"^READY xds=[\d.]+:(\d+) admin=[\d.]+:(\d+)", timeout_s=30)
        self.xds_port, self.admin_port = int(match.group(1)), int(match.group(2))
        self.control_plane = process
        return process

    def stop_control_plane(self) -> None:
        if self.control_plane is not None:
            self.control_plane.stop()
            self.control_plane = None

    # Envoy
    def start_envoy(
        self,
        node_id: str | None = None,
        listen_port: int | None = None,
        admin_port: int | None = None,
        wait: bool = True,
    ) -> EnvoyHandle:
        if self.control_plane is None and self.xds_port == 0:
            raise RuntimeError("start the control plane before Envoy: the bootstrap needs its port")
        node_id = node_id or f"gateway-{len(self.envoys)}"
        listen_port = listen_port or free_port()
        admin_port = admin_port or free_port()
        bootstrap = self.settings.work_dir / f"envoy-{node_id}.yaml"
        bootstrap.parent.mkdir(parents=True, exist_ok=True)
        bootstrap.write_text(
            render_bootstrap(
                BootstrapParams(
                    node_id=node_id, xds_port=self.xds_port, admin_port=admin_port, listen_port=listen_port
                )
            )
        )
        argv = [
            envoy_binary(),
            "-c",
            str(bootstrap),
            "--concurrency",
            str(self.settings.envoy_concurrency),
            "--log-level",
            self.settings.envoy_log_level,
            # Several Envoys share this host in tests; hot restart's shared memory would make them collide.
            "--disable-hot-restart",
            "--drain-time-s",
            "1",
        ]
        process = ManagedProcess(f"envoy-{node_id}", argv, self._log(f"envoy-{node_id}")).start()
        handle = EnvoyHandle(process=process, node_id=node_id, listen_port=listen_port, admin_port=admin_port)
        self.envoys.append(handle)
        if wait:
            self.wait_envoy_ready(handle)
        return handle

    def wait_envoy_ready(self, handle: EnvoyHandle, timeout_s: float = 30) -> None:
        def ready() -> bool:
            if not handle.process.alive():
                raise RuntimeError(f"Envoy {handle.node_id} exited:\n{handle.process.log_text()[-3000:]}")
            return http_ok(f"{handle.admin_url}/ready") and http_ok(f"{handle.url}/health")

        wait_until(ready, timeout_s, f"Envoy {handle.node_id} to serve on {handle.url}")

    def start(self) -> None:
        self.start_simulators()
        self.start_control_plane()
        self.start_envoy()

    def stop(self, processes: Sequence[ManagedProcess] | None = None) -> None:
        """Stop everything this stack started, Envoys first so no request meets a stopped backend."""
        if processes is None:
            processes = [e.process for e in self.envoys]
            processes += [p for p in (self.control_plane,) if p is not None]
            processes += list(self.simulators.values())
        for process in processes:
            process.stop()
