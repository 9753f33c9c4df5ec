"""`make run`: the whole local stack in the foreground until Ctrl-C."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from control_plane.devstack.logrotate import AccessLogRotator
from control_plane.devstack.observability import NotInstalled, ObservabilityStack, find_binaries
from control_plane.devstack.ports import RegistryMirror, parse_sim_ports
from control_plane.devstack.procs import ManagedProcess, free_port
from control_plane.devstack.stack import LocalStack, StackSettings
from control_plane.devstack.supervisor import Backoff, Supervisor, Target
from control_plane.errors import ConfigError
from control_plane.observability.render import Timings
from control_plane.secret_files import private_dir


@dataclass(frozen=True)
class DevStackSettings:
    config_path: Path
    listen_port: int | None = None  # None: the registry's gateway.listen_port
    admin_port: int = 8081
    xds_port: int = 18000
    envoy_admin_port: int = 9901
    state_dir: Path = Path("var")
    envoy_concurrency: int = 2
    admin_token: str | None = None  # None: generate one for this run and print it
    prometheus_port: int = 9090  # 0: a free one (so are all the ports above)
    alertmanager_port: int = 9093
    sim_ports: str = "registry"  # 'registry', 'auto' (free ports) or '+N' (see devstack/ports.py)
    backoff: Backoff = field(default_factory=Backoff)  # restarts of a process that died


class _Stop(Exception):
    pass


def _sims(stack: LocalStack) -> list[tuple[str, ManagedProcess]]:
    return sorted((p.name, p) for p in stack.simulators.values())


def _port_of(argv: list[str]) -> str:
    return argv[argv.index("--port") + 1] if "--port" in argv else "?"


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _start_observability(
    stack: LocalStack, settings: DevStackSettings
) -> tuple[ObservabilityStack | None, str]:
    """Prometheus and Alertmanager when installed; otherwise a line that says how to get them."""
    if isinstance(find_binaries(), NotInstalled):
        return None, f"  Prometheus         not installed: {find_binaries()}"
    obs = ObservabilityStack(
        stack.settings.work_dir,
        prometheus_port=settings.prometheus_port,
        alertmanager_port=settings.alertmanager_port,
        timings=Timings(scrape_interval_s=5, evaluation_interval_s=5),
    )
    try:
        # The control plane writes the model servers' file-SD targets into obs.targets_dir itself.
        obs.start(
            [e.admin_url for e in stack.envoys],
            stack.admin_url,
            stack.settings.admin_token,
            write_targets=False,
        )
    except (RuntimeError, TimeoutError, OSError) as exc:
        obs.stop()
        return None, f"  Prometheus         not started: {exc}"
    return obs, f"  Prometheus         {obs.prometheus_url}\n  Alertmanager       {obs.alertmanager_url}"


def _banner(stack: LocalStack, settings: DevStackSettings, observability: str, simulators: str) -> str:
    envoy = stack.envoys[0]
    b = settings.backoff
    models = ", ".join(m.id for m in stack.registry().models)
    if settings.admin_token:
        # The operator chose it: never echo it (consoles get logged and shared).
        status_page = f"{stack.admin_url}/   (sign in with your ADMIN_TOKEN)"
        token_line = "  Admin token        yours (ADMIN_TOKEN)"
        export = ""
    else:
        token = stack.settings.admin_token
        status_page = f"{stack.admin_url}/#token={token}"
        token_line = f"  Admin token        {token}   (generated for this run: set ADMIN_TOKEN to choose one)"
        export = f"  export ADMIN_TOKEN={token}\n"
    return f"""
LLM gateway is up.
  OpenAI-style API   {envoy.url}/v1        (models: {models})
  Status page        {status_page}
  Admin API          {stack.admin_url}      (metrics: {stack.admin_url}/metrics)
  Envoy admin        {envoy.admin_url}
  Control plane xDS  127.0.0.1:{stack.xds_port}   (each Envoy authenticates with its node credential)
{observability}
{simulators}
  Logs               {settings.state_dir / "logs"}/   (private to you; restarts in supervisor.log)
{token_line}

Try:
  curl -s {envoy.url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "qwen2", "messages": [{{"role": "user", "content": "Hello"}}]}}'

{export}  curl -s {stack.admin_url}/admin/models -H "Authorization: Bearer $ADMIN_TOKEN"

Edit {settings.config_path} to add or change models: the change is live within a second.
A process that dies is restarted (backoff {b.initial_s:g}s, doubling up to {b.max_s:g}s).
Press Ctrl-C to stop every process this started.
"""


def _observability_targets(obs: ObservabilityStack | None) -> list[Target]:
    return [
        Target(
            name=p.name,
            alive=p.alive,
            restart=p.start,
            exit_info=lambda p=p: f"exit status {p.returncode()}, log {p.log_path}",  # type: ignore[misc]
        )
        for p in (obs.processes if obs else [])
    ]


def _private_state_dir(state_dir: Path) -> None:
    """The state directory holds the admin database, secrets, bootstraps and logs: 0700."""
    for path in (state_dir, state_dir / "logs"):
        private_dir(path)
        os.chmod(path, 0o700)


def _lock_state_dir(state_dir: Path) -> int | None:
    """Hold `<state dir>/devstack.lock` for this run; None if another run holds it."""
    fd = os.open(state_dir / "devstack.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd  # released when the process exits


def run_devstack(settings: DevStackSettings) -> int:
    state_dir = settings.state_dir.resolve()
    _private_state_dir(state_dir)
    if _lock_state_dir(state_dir) is None:
        print(
            f"error: {state_dir} is in use by another `make run`; a second stack needs its own: "
            "make run FREE_PORTS=1 STATE_DIR=var2"
        )
        return 2
    try:
        ports = parse_sim_ports(settings.sim_ports)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    mirror: RegistryMirror | None = None
    config_path = settings.config_path.resolve()
    if ports is not None:
        # The control plane and the simulators read a mirror of the registry with the moved ports.
        mirror = RegistryMirror(config_path, state_dir / "models.local.yaml", ports).start()
        config_path = mirror.target
    # Ports 0 are picked now: the status page and Prometheus must agree on them before either starts.
    settings = dataclasses.replace(
        settings,
        prometheus_port=settings.prometheus_port or free_port(),
        alertmanager_port=settings.alertmanager_port or free_port(),
        envoy_admin_port=settings.envoy_admin_port or free_port(),
    )
    stack = LocalStack(
        StackSettings(
            config_path=config_path,
            work_dir=state_dir,
            xds_port=settings.xds_port,
            admin_port=settings.admin_port,
            envoy_concurrency=settings.envoy_concurrency,
            admin_token=settings.admin_token or secrets.token_urlsafe(24),
            state_db=state_dir / "gateway.db",
            prometheus_url=None
            if isinstance(find_binaries(), NotInstalled)
            else f"http://127.0.0.1:{settings.prometheus_port}",
            alertmanager_url=None
            if isinstance(find_binaries(), NotInstalled)
            else f"http://127.0.0.1:{settings.alertmanager_port}",
        )
    )
    obs: ObservabilityStack | None = None
    previous_int = signal.signal(signal.SIGINT, _raise_stop)
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        try:
            listen_port = settings.listen_port
            if listen_port is None:
                listen_port = stack.registry().gateway.listen_port
            listen_port = listen_port or free_port()
            print("starting simulated model servers ...", flush=True)
            stack.start_simulators()
            print("starting the control plane ...", flush=True)
            stack.start_control_plane()
            print("starting Envoy ...", flush=True)
            stack.start_envoy(
                node_id="gateway-0", listen_port=listen_port, admin_port=settings.envoy_admin_port
            )
        except ConfigError as exc:
            print(f"error: {exc}")
            return 2
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"error: the stack did not start: {exc}")
            return 1
        print("starting Prometheus and Alertmanager ...", flush=True)
        obs, observability = _start_observability(stack, settings)
        simulators = "  Simulators         " + ", ".join(
            f"{name.removeprefix('sim-')} :{_port_of(p.argv)}" for name, p in _sims(stack)
        )
        print(_banner(stack, settings, observability, simulators), flush=True)

        def report(line: str) -> None:  # on the console and in logs/supervisor.log
            print(line, flush=True)
            stack.supervisor_log(line)

        supervisor = Supervisor(
            lambda: [*stack.supervised_targets(), *_observability_targets(obs)],
            report=report,
            backoff=settings.backoff,
        )
        # Each Envoy's access log (logs/access-<node>.log): renamed at 64 MiB, 5 kept, Envoy reopens it.
        rotator = AccessLogRotator(
            lambda: [(stack.access_log_path(e.node_id), e.admin_url) for e in stack.envoys]
        )
        ticks = 0
        while True:
            time.sleep(0.5)
            supervisor.check()
            rotator.check()
            ticks += 1
            if obs is not None and ticks % 10 == 0:
                # Models found in the model directories (or added through the admin API) after Prometheus
                # started: their Envoy series get the exact `model` label too (ids with '.', '/' ...).
                obs.follow_models(stack.admin_url, stack.settings.admin_token)
    except _Stop:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if mirror is not None:
            mirror.stop()
        if obs is not None:
            obs.stop()
        stack.stop()
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
