"""Prometheus and Alertmanager as child processes of the local stack (and of the tests).

They are Debian's `prometheus` and `prometheus-alertmanager` packages (or the upstream binaries on PATH, or
$PROMETHEUS_BIN / $ALERTMANAGER_BIN). When they are missing, `find_binaries()` returns a `NotInstalled`
whose message says how to install them; the gateway itself runs without them.

Layout under the work directory:

    prometheus/prometheus.yml      rendered from observability/prometheus/prometheus.yml
    prometheus/rules/              a copy of the rules with short `for:` (only when asked; else the
                                   repository's observability/rules/gateway.rules.yml is loaded)
    prometheus/targets/            file-SD files (backends.json, gpu.json)
    prometheus/data/               TSDB
    alertmanager/alertmanager.yml  rendered from observability/alertmanager/alertmanager.yml
    alertmanager/webhook-token     the admin bearer token (mode 0600), read by Alertmanager
    alertmanager/data/
    logs/prometheus.log, logs/alertmanager.log
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from control_plane.config.schema import Registry
from control_plane.devstack.procs import ManagedProcess, free_port, http_ok, wait_until
from control_plane.observability.file_sd import FileSdWriter
from control_plane.observability.render import (
    RULES_FILE,
    AlertmanagerParams,
    PrometheusParams,
    Timings,
    render_alertmanager_config,
    render_prometheus_config,
    rules_for,
    webhook_url,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "sudo apt-get install prometheus prometheus-alertmanager"
DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_ALERTMANAGER_PORT = 9093


@dataclass(frozen=True)
class Binaries:
    prometheus: str
    alertmanager: str
    promtool: str | None = None
    amtool: str | None = None


@dataclass(frozen=True)
class NotInstalled:
    """Prometheus and/or Alertmanager are not installed: what is missing and how to install it."""

    missing: tuple[str, ...]
    install_hint: str = INSTALL_HINT

    @property
    def message(self) -> str:
        return (
            f"Prometheus/Alertmanager not found ({', '.join(self.missing)} not on PATH): "
            f"install them with `{self.install_hint}` (Debian/Ubuntu), or set PROMETHEUS_BIN / "
            "ALERTMANAGER_BIN. The gateway runs without them; only metrics history and alerts are missing."
        )

    def __str__(self) -> str:
        return self.message


class ObservabilityNotInstalled(RuntimeError):
    def __init__(self, missing: NotInstalled) -> None:
        super().__init__(missing.message)
        self.missing = missing


def _which(env: str, *names: str) -> str | None:
    explicit = os.environ.get(env)
    if explicit:
        return explicit if shutil.which(explicit) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def find_binaries() -> Binaries | NotInstalled:
    """Prometheus and Alertmanager executables (Debian names first), or what is missing."""
    prometheus = _which("PROMETHEUS_BIN", "prometheus")
    alertmanager = _which("ALERTMANAGER_BIN", "prometheus-alertmanager", "alertmanager")
    missing = tuple(
        name for name, path in (("prometheus", prometheus), ("alertmanager", alertmanager)) if path is None
    )
    if prometheus is None or alertmanager is None:
        return NotInstalled(missing)
    return Binaries(
        prometheus=prometheus,
        alertmanager=alertmanager,
        promtool=shutil.which("promtool"),
        amtool=shutil.which("amtool"),
    )


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _post(url: str, timeout_s: float = 5.0) -> None:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


class ObservabilityStack:
    """Prometheus scraping Envoy, the control plane and every model server, and Alertmanager sending to
    the control plane's webhook.

        obs = ObservabilityStack(work_dir)                       # 127.0.0.1:9090 and :9093
        obs.start([envoy.admin_url], stack.admin_url, token, stack.registry())
        obs.update_targets(new_registry)                         # after a registry change
        obs.stop()

    Ports 0 pick free ones. `timings=Timings.fast()` and `for_s=1` make alerts fire within seconds."""

    def __init__(
        self,
        work_dir: Path,
        *,
        prometheus_port: int = DEFAULT_PROMETHEUS_PORT,
        alertmanager_port: int = DEFAULT_ALERTMANAGER_PORT,
        host: str = "127.0.0.1",
        timings: Timings | None = None,
        for_s: float | None = None,
        rules_file: Path = RULES_FILE,
        retention: str = "15d",
        binaries: Binaries | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.host = host
        self.prometheus_port = prometheus_port
        self.alertmanager_port = alertmanager_port
        self.timings = timings or Timings()
        self.for_s = for_s
        self.rules_file = rules_file
        self.retention = retention
        self._binaries = binaries
        self.prometheus: ManagedProcess | None = None
        self.alertmanager: ManagedProcess | None = None
        self._envoy_targets: list[str] = []
        self._control_plane_url = ""
        self._model_ids: tuple[str, ...] = ()
        self._sd = FileSdWriter(self.targets_dir)

    # Paths and addresses
    @property
    def prometheus_dir(self) -> Path:
        return self.work_dir / "prometheus"

    @property
    def alertmanager_dir(self) -> Path:
        return self.work_dir / "alertmanager"

    @property
    def targets_dir(self) -> Path:
        """The file-SD directory: give it to whatever keeps the targets current (FileSdWriter)."""
        return self.prometheus_dir / "targets"

    @property
    def prometheus_config_path(self) -> Path:
        return self.prometheus_dir / "prometheus.yml"

    @property
    def alertmanager_config_path(self) -> Path:
        return self.alertmanager_dir / "alertmanager.yml"

    @property
    def rules_path(self) -> Path:
        """The rule file Prometheus loads: the repository's own (edit it, then `reload()`), or a copy with
        shortened `for:` durations when `for_s` is set."""
        if self.for_s is None:
            return self.rules_file
        return self.prometheus_dir / "rules" / self.rules_file.name

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.host}:{self.alertmanager_port}"

    @property
    def processes(self) -> list[ManagedProcess]:
        return [p for p in (self.prometheus, self.alertmanager) if p is not None]

    def _log(self, name: str) -> Path:
        return self.work_dir / "logs" / f"{name}.log"

    # Lifecycle
    def binaries(self) -> Binaries:
        if self._binaries is None:
            found = find_binaries()
            if isinstance(found, NotInstalled):
                raise ObservabilityNotInstalled(found)
            self._binaries = found
        return self._binaries

    def start(
        self,
        envoy_admin_urls: Sequence[str],
        control_plane_admin_url: str,
        admin_token: str,
        registry: Registry | None = None,
        *,
        write_targets: bool = True,
        timeout_s: float = 30.0,
    ) -> None:
        """Render the configs, write the file-SD targets from `registry` and start Alertmanager, then
        Prometheus; return once both answer /-/ready. Raises ObservabilityNotInstalled, or RuntimeError
        naming a busy port or a process that exited (with its log tail).

        `registry` also names the models for the Envoy `model` relabelling. `write_targets=False` leaves the
        file-SD files to someone else (the control plane, which sees admin-added endpoints too): then only
        missing files are created, empty."""
        binaries = self.binaries()
        self._pick_ports()
        self._envoy_targets = list(envoy_admin_urls)
        self._control_plane_url = control_plane_admin_url
        if registry is not None:
            self._model_ids = tuple(sorted({m.id for m in registry.models}))
        if registry is not None and write_targets:
            self._sd.write(registry)
        else:
            self.targets_dir.mkdir(parents=True, exist_ok=True)
            for path in (self._sd.backends_path, self._sd.gpu_path):
                # O_EXCL: never clobber a file the control plane has just written.
                with contextlib.suppress(FileExistsError):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    with os.fdopen(fd, "w", encoding="utf-8") as handle:
                        handle.write("[]\n")
        self._write_alertmanager_config(control_plane_admin_url, admin_token)
        self._write_rules()
        self._write_prometheus_config()
        try:
            self.alertmanager = self._start_alertmanager(binaries, timeout_s)
            self.prometheus = self._start_prometheus(binaries, timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Prometheus, then Alertmanager (SIGTERM, SIGKILL after 10 s)."""
        for process in (self.prometheus, self.alertmanager):
            if process is not None:
                process.stop()
        self.prometheus = None
        self.alertmanager = None

    def update_targets(self, registry: Registry, *, write_targets: bool = True) -> bool:
        """Rewrite the file-SD targets from `registry` (Prometheus picks them up by itself within a few
        seconds; skipped with `write_targets=False`). When the set of models changed, re-render
        prometheus.yml for the model relabelling and reload Prometheus. True if anything changed."""
        changed = self._sd.write(registry) if write_targets else False
        return self.set_model_ids(m.id for m in registry.models) or changed

    def set_model_ids(self, model_ids: Iterable[str]) -> bool:
        """The models whose Envoy series need an exact `model` relabelling (ids with '.', '/' ...): when
        they changed, re-render prometheus.yml and reload Prometheus. True if it was reloaded."""
        ids = tuple(sorted(set(model_ids)))
        if ids == self._model_ids:
            return False
        self._model_ids = ids
        if self._write_prometheus_config():
            self.reload()
            return True
        return False

    def follow_models(self, control_plane_admin_url: str, admin_token: str) -> bool:
        """`set_model_ids` with the models the control plane serves now (its admin API), discovered and
        admin-added ones included; False (and unchanged) when it does not answer."""
        request = urllib.request.Request(
            control_plane_admin_url.rstrip("/") + "/admin/models",
            headers={"authorization": f"Bearer {admin_token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                models = json.loads(response.read())["models"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("the control plane's models could not be read: %s", exc)
            return False
        return self.set_model_ids(str(m["id"]) for m in models)

    def set_scrape_targets(self, envoy_admin_urls: Sequence[str], control_plane_admin_url: str) -> None:
        """Point Prometheus at other Envoys / another control-plane port, and reload it."""
        self._envoy_targets = list(envoy_admin_urls)
        self._control_plane_url = control_plane_admin_url
        if self._write_prometheus_config():
            self.reload()

    def reload(self) -> None:
        """Make Prometheus re-read its config and rules (POST /-/reload; no-op if it is not running)."""
        if self.prometheus is not None and self.prometheus.alive():
            _post(f"{self.prometheus_url}/-/reload")

    # Internals
    def _pick_ports(self) -> None:
        for attr, what in (("prometheus_port", "Prometheus"), ("alertmanager_port", "Alertmanager")):
            port = getattr(self, attr)
            if port == 0:
                setattr(self, attr, free_port(self.host))
            elif not _port_free(self.host, port):
                raise RuntimeError(
                    f"{what} cannot listen on {self.host}:{port}: the port is in use (a system "
                    f"{what} service from the Debian package? `systemctl disable --now "
                    f"{'prometheus' if what == 'Prometheus' else 'prometheus-alertmanager'}`, "
                    "or choose another port)"
                )

    def _write_alertmanager_config(self, control_plane_admin_url: str, admin_token: str) -> None:
        self.alertmanager_dir.mkdir(parents=True, exist_ok=True)
        token_file = self.alertmanager_dir / "webhook-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(admin_token)
        os.chmod(token_file, 0o600)
        params = AlertmanagerParams(
            webhook_url=webhook_url(control_plane_admin_url),
            credentials_file=token_file,
            timings=self.timings,
        )
        self.alertmanager_config_path.write_text(render_alertmanager_config(params), encoding="utf-8")

    def _write_rules(self) -> None:
        if self.for_s is not None:
            self.rules_path.parent.mkdir(parents=True, exist_ok=True)
            self.rules_path.write_text(rules_for(self.for_s, self.rules_file), encoding="utf-8")

    def _write_prometheus_config(self) -> bool:
        params = PrometheusParams(
            envoy_targets=self._envoy_targets,
            control_plane_target=self._control_plane_url,
            targets_dir=self.targets_dir,
            rule_files=(self.rules_path,),
            prometheus_address=f"{self.host}:{self.prometheus_port}",
            alertmanager_address=f"{self.host}:{self.alertmanager_port}",
            timings=self.timings,
            model_ids=self._model_ids,
        )
        text = render_prometheus_config(params)
        self.prometheus_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if self.prometheus_config_path.read_text(encoding="utf-8") == text:
                return False
        tmp = self.prometheus_config_path.with_suffix(".yml.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.prometheus_config_path)
        return True

    def _wait_ready(self, process: ManagedProcess, url: str, timeout_s: float) -> None:
        def ready() -> bool:
            if not process.alive():
                raise RuntimeError(
                    f"{process.name} exited with {process.returncode()} (log {process.log_path}):\n"
                    f"{process.log_text()[-3000:]}"
                )
            return http_ok(f"{url}/-/ready")

        try:
            wait_until(ready, timeout_s, f"{process.name} to be ready at {url}", interval_s=0.1)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}:\n{process.log_text()[-3000:]}") from None

    def _start_alertmanager(self, binaries: Binaries, timeout_s: float) -> ManagedProcess:
        data = self.alertmanager_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            binaries.alertmanager,
            f"--config.file={self.alertmanager_config_path}",
            f"--storage.path={data}",
            f"--web.listen-address={self.host}:{self.alertmanager_port}",
            f"--web.external-url={self.alertmanager_url}/",
            "--cluster.listen-address=",  # empty: no gossip clustering (a single local instance)
        ]
        process = ManagedProcess("alertmanager", argv, self._log("alertmanager"), cwd=self.work_dir).start()
        self._wait_ready(process, self.alertmanager_url, timeout_s)
        return process

    def _start_prometheus(self, binaries: Binaries, timeout_s: float) -> ManagedProcess:
        data = self.prometheus_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            binaries.prometheus,
            f"--config.file={self.prometheus_config_path}",
            f"--storage.tsdb.path={data}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={self.host}:{self.prometheus_port}",
            f"--web.external-url={self.prometheus_url}/",
            "--web.enable-lifecycle",  # POST /-/reload after a config change
        ]
        process = ManagedProcess("prometheus", argv, self._log("prometheus"), cwd=self.work_dir).start()
        self._wait_ready(process, self.prometheus_url, timeout_s)
        return process
