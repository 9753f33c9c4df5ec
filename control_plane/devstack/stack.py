"""The local stack: simulated model servers for the registry's loopback endpoints, the control plane and
one or more Envoys, each a child process on loopback."""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from control_plane.config.loader import load_registry
from control_plane.config.schema import ModelConfig, Registry
from control_plane.devstack.procs import ManagedProcess, free_port, http_ok, wait_until
from control_plane.devstack.supervisor import Backoff, Supervisor, Target
from control_plane.envoy_bootstrap import REPO_ROOT, BootstrapParams, envoy_binary, render_bootstrap
from control_plane.secret_files import private_dir, write_private
from control_plane.xds.auth import node_token


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
    # Every Envoy's xDS credential derives from it (xds/auth.py); the control plane reads it from a 0600
    # file, never from its command line.
    xds_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    state_db: Path | None = None  # default: <work_dir>/state.db, kept across control-plane restarts
    file_sd_dir: Path | None = None  # default: <work_dir>/prometheus/targets (where Prometheus looks)
    prometheus_url: str | None = None  # gives the status page its latency charts
    alertmanager_url: str | None = None  # linked from the status page


def _target(process: ManagedProcess, restart: Callable[[], object]) -> Target:
    return Target(
        name=process.name,
        alive=process.alive,
        restart=restart,
        exit_info=lambda: f"exit status {process.returncode()}, log {process.log_path}",
    )


class LocalStack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.simulators: dict[str, ManagedProcess] = {}
        self.control_plane: ManagedProcess | None = None
        self.envoys: list[EnvoyHandle] = []
        self.xds_port = settings.xds_port
        self.admin_port = settings.admin_port
        self._cp_starts = 0
        self.supervisor: Supervisor | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def registry(self) -> Registry:
        return load_registry(self.settings.config_path)

    def _log(self, name: str) -> Path:
        return self.settings.work_dir / "logs" / f"{name}.log"

    @property
    def xds_secret_path(self) -> Path:
        return self.settings.work_dir / "secrets" / "xds-secret"

    def xds_token(self, node_id: str) -> str:
        """The xDS credential of `node_id` (what its Envoy bootstrap carries)."""
        return node_token(self.settings.xds_secret, node_id)

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
        process = ManagedProcess(f"sim-{endpoint_id}", argv, self._log(f"sim-{endpoint_id}"), cwd=REPO_ROOT)
        process.ready_from = process.log_size()  # the log is appended to: READY must be a new line
        process.start()
        self.simulators[endpoint_id] = process
        if wait:
            process.wait_for_line(r"^READY ", timeout_s=30, since=process.ready_from)
        return process

    def start_simulators(self) -> None:
        """One simulator per loopback endpoint of the registry (remote endpoints are real servers)."""
        started = []
        for model in self.registry().models:
            for index, endpoint in enumerate(model.endpoints):
                if is_loopback(endpoint.host) and model.endpoint_id(index) not in self.simulators:
                    started.append(self.start_simulator(model, index, wait=False))
        for process in started:
            process.wait_for_line(r"^READY ", timeout_s=30, since=process.ready_from)

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
            "--xds-secret-file",
            str(write_private(self.xds_secret_path, self.settings.xds_secret + "\n")),
        ]
        log = self._log(f"control-plane-{self._cp_starts}")
        if self.settings.prometheus_url:
            argv += ["--prometheus-url", self.settings.prometheus_url]
        if self.settings.alertmanager_url:
            argv += ["--alertmanager-url", self.settings.alertmanager_url]
        env = {**os.environ, "ADMIN_TOKEN": self.settings.admin_token}
        env.pop("XDS_SECRET", None)  # the file is this stack's secret
        process = ManagedProcess("control-plane", argv, log, env=env, cwd=REPO_ROOT).start()
        # Held before it is ready, so that stop() (and the supervisor) can see it whatever happens next.
        self.control_plane = process
        match = process.wait_for_line(r"^READY xds=[\d.]+:(\d+) admin=[\d.]+:(\d+)", timeout_s=30)
        self.xds_port, self.admin_port = int(match.group(1)), int(match.group(2))
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
        params = BootstrapParams(
            node_id=node_id,
            xds_port=self.xds_port,
            admin_port=admin_port,
            listen_port=listen_port,
            xds_token=self.xds_token(node_id),
            # Each Envoy its own access log, next to the stack's other logs (logrotate.py rotates them).
            access_log_path=str(self.access_log_path(node_id)),
        )
        write_private(bootstrap, render_bootstrap(params))  # it holds the node's xDS credential
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
            # Access-log lines reach the file within a second instead of Envoy's default 10 s, so an
            # operator tailing it sees a request as it ends.
            "--file-flush-interval-msec",
            "1000",
        ]
        process = ManagedProcess(f"envoy-{node_id}", argv, self._log(f"envoy-{node_id}")).start()
        handle = EnvoyHandle(process=process, node_id=node_id, listen_port=listen_port, admin_port=admin_port)
        self.envoys.append(handle)
        if wait:
            self.wait_envoy_ready(handle)
        return handle

    def access_log_path(self, node_id: str) -> Path:
        return (self.settings.work_dir / "logs" / f"access-{node_id}.log").resolve()

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

    # Supervision
    def supervised_targets(self) -> list[Target]:
        """What a supervisor restarts when it dies: the simulators, the control plane, the Envoys, each
        started again as it was (same ports, same bootstrap). A process stopped through the stack's own
        methods (stop_control_plane) is no longer a target."""
        targets = [_target(p, partial(self._restart_simulator, p)) for p in list(self.simulators.values())]
        if self.control_plane is not None:
            targets.append(_target(self.control_plane, self.start_control_plane))
        targets += [_target(e.process, partial(self._restart_envoy, e)) for e in list(self.envoys)]
        return targets

    def _restart_simulator(self, process: ManagedProcess) -> None:
        process.ready_from = process.log_size()
        process.start()
        process.wait_for_line(r"^READY ", timeout_s=30, since=process.ready_from)

    def _restart_envoy(self, handle: EnvoyHandle) -> None:
        handle.process.start()
        self.wait_envoy_ready(handle)

    def supervise(
        self, backoff: Backoff | None = None, report: Callable[[str], None] | None = None
    ) -> Supervisor:
        """Restart whatever of this stack dies, from a background thread, until stop()."""
        self.supervisor = Supervisor(
            self.supervised_targets, report=report or self.supervisor_log, backoff=backoff or Backoff()
        )
        return self.supervisor.start_thread()

    def supervisor_log(self, line: str) -> None:
        """Append a supervisor line to logs/supervisor.log (0600)."""
        path = self._log("supervisor")
        private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    def stop(self, processes: Sequence[ManagedProcess] | None = None) -> None:
        """Stop everything this stack started, Envoys first so no request meets a stopped backend."""
        if self.supervisor is not None and processes is None:
            self.supervisor.stop()  # first: nothing may be restarted while the stack goes down
            self.supervisor = None
        if processes is None:
            processes = [e.process for e in self.envoys]
            processes += [p for p in (self.control_plane,) if p is not None]
            processes += list(self.simulators.values())
        for process in processes:
            process.stop()
