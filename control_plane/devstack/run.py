"""`make run`: the whole local stack in the foreground until Ctrl-C."""

from __future__ import annotations

import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from control_plane.devstack.observability import NotInstalled, ObservabilityStack, find_binaries
from control_plane.devstack.stack import LocalStack, StackSettings
from control_plane.errors import ConfigError
from control_plane.observability.render import Timings


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
    prometheus_port: int = 9090
    alertmanager_port: int = 9093


class _Stop(Exception):
    pass


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


def _banner(stack: LocalStack, settings: DevStackSettings, observability: str) -> str:
    envoy = stack.envoys[0]
    token = stack.settings.admin_token
    models = ", ".join(m.id for m in stack.registry().models)
    return f"""
LLM gateway is up.
  OpenAI-style API   {envoy.url}/v1        (models: {models})
  Status page        {stack.admin_url}/#token={token}
  Admin API          {stack.admin_url}      (metrics: {stack.admin_url}/metrics)
  Envoy admin        {envoy.admin_url}
{observability}
  Logs               {settings.state_dir / "logs"}/
  Admin token        {token}{"" if settings.admin_token else " (generated: set ADMIN_TOKEN to choose one)"}

Try:
  curl -s {envoy.url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "qwen2", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  curl -s {stack.admin_url}/admin/models -H "Authorization: Bearer {token}"

Edit {settings.config_path} to add or change models: the change is live within a second.
Press Ctrl-C to stop every process this started.
"""


def run_devstack(settings: DevStackSettings) -> int:
    stack = LocalStack(
        StackSettings(
            config_path=settings.config_path.resolve(),
            work_dir=settings.state_dir.resolve(),
            xds_port=settings.xds_port,
            admin_port=settings.admin_port,
            envoy_concurrency=settings.envoy_concurrency,
            admin_token=settings.admin_token or secrets.token_urlsafe(24),
            state_db=settings.state_dir.resolve() / "gateway.db",
            prometheus_url=None
            if isinstance(find_binaries(), NotInstalled)
            else f"http://127.0.0.1:{settings.prometheus_port}",
        )
    )
    obs: ObservabilityStack | None = None
    previous_int = signal.signal(signal.SIGINT, _raise_stop)
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        try:
            listen_port = settings.listen_port or stack.registry().gateway.listen_port
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
        print(_banner(stack, settings, observability), flush=True)
        reported: set[str] = set()
        while True:
            time.sleep(1)
            for process in [
                *stack.simulators.values(),
                stack.control_plane,
                *(e.process for e in stack.envoys),
                *(obs.processes if obs else []),
            ]:
                if process is not None and not process.alive() and process.name not in reported:
                    reported.add(process.name)
                    print(
                        f"warning: {process.name} exited with {process.returncode()} "
                        f"(log: {process.log_path})",
                        flush=True,
                    )
    except _Stop:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if obs is not None:
            obs.stop()
        stack.stop()
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
