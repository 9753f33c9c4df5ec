"""The lifecycle parts wired together in the control plane's process: the model directories' scan (a
registry layer), the manager, the activator's HTTP server, and the admin routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.params import Depends
from prometheus_client import CollectorRegistry

from control_plane.admin.lifecycle import register_lifecycle_routes
from control_plane.config.schema import ModelConfig, Registry
from control_plane.devstack.procs import free_port
from control_plane.http_server import EmbeddedServer, bind, embedded_server
from control_plane.lifecycle.activator import create_activator_app, upstream_client
from control_plane.lifecycle.autoscale import ReplicaSignalReader
from control_plane.lifecycle.discovery import scan
from control_plane.lifecycle.external import EndpointScaling
from control_plane.lifecycle.launchers import SimulatorLauncher, launcher_for
from control_plane.lifecycle.manager import Engine, LifecycleManager
from control_plane.lifecycle.metrics import LifecycleMetrics
from control_plane.lifecycle.process import EngineProcess
from control_plane.lifecycle.registry_layer import DiscoveredModels
from control_plane.lifecycle.types import LaunchSpec
from control_plane.service import ControlPlane
from control_plane.state import Health
from control_plane.telemetry.scraper import TelemetryScraper
from control_plane.xds.lrs import LoadReportStore

log = logging.getLogger(__name__)


def _engines(log_dir: Path) -> Any:
    def start(spec: LaunchSpec, model: ModelConfig) -> Engine:
        launch = model.launch
        assert launch is not None
        if launch.launcher == "simulator":
            launcher: Any = SimulatorLauncher(
                load_time_s=launch.load_time_s, profile="fast", extra_args=launch.extra_args
            )
        else:
            launcher = launcher_for(launch.launcher, extra_args=launch.extra_args)
        return EngineProcess(spec, launcher, log_dir)

    return start


@dataclass
class LifecycleWiring:
    discovered: DiscoveredModels
    manager: LifecycleManager
    external: EndpointScaling
    upstream: httpx.AsyncClient
    activator_socket: socket.socket
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _server: EmbeddedServer | None = None

    @classmethod
    def create(
        cls,
        registry: Registry,
        config_path: Path,
        log_dir: Path,
        loads: LoadReportStore,
        metrics_registry: CollectorRegistry,
        activator_host: str = "127.0.0.1",
    ) -> LifecycleWiring:
        """Scans the model directories once, so the plane's first registry has their models."""
        discovered = DiscoveredModels(config_path.parent, scan)
        discovered.rescan(registry)
        sock = bind(activator_host, 0)
        metrics = LifecycleMetrics.create(metrics_registry)
        # Models with fixed endpoints: their desired replicas, for HPA / KEDA (its own scraper session).
        external = EndpointScaling(
            ReplicaSignalReader(TelemetryScraper(timeout_s=1.0), loads.in_flight, time.monotonic), metrics
        )
        manager = LifecycleManager(
            publish=lambda model_id, replicas: None,  # set in start(): the plane does not exist yet
            engines=_engines(log_dir),
            metrics=metrics,
            in_flight=loads.in_flight,
            issued=loads.issued_total,
            free_port=free_port,
            report_interval_s=loads.interval_s,
        )
        return cls(
            discovered=discovered,
            manager=manager,
            external=external,
            upstream=upstream_client(),
            activator_socket=sock,
        )

    @property
    def activator_address(self) -> tuple[str, int]:
        host, port = self.activator_socket.getsockname()[:2]
        return str(host), int(port)

    def status_of(self, model_id: str) -> dict[str, Any] | None:
        return self.manager.status(model_id) if self.manager.knows(model_id) else None

    async def start(self, plane: ControlPlane) -> None:
        self.manager.set_publisher(plane.set_launched)
        # The prober's verdicts on launched replicas: one unhealthy for long enough is replaced.
        self.manager.set_health(lambda replica_id: plane.inputs.health.get(replica_id) is Health.UNHEALTHY)
        plane.set_activator(self.activator_address)
        plane.add_registry_listener(self.manager.follow)
        await self.manager.follow(plane.registry)
        app = create_activator_app(self.manager, self.upstream)
        self._server = embedded_server(app)
        self._tasks = [
            asyncio.create_task(self._server.serve(sockets=[self.activator_socket])),
            asyncio.create_task(self.manager.run()),
            asyncio.create_task(self._scan_loop(plane)),
            asyncio.create_task(self._external_loop(plane)),
        ]
        self._plane = plane

    async def rescan(self) -> bool:
        """Scan the model directories again; apply the registry again if what they hold changed."""
        plane = self._plane
        changed = await asyncio.to_thread(self.discovered.rescan, plane.registry)
        if changed:
            await plane.reapply()
        return changed

    async def _scan_loop(self, plane: ControlPlane) -> None:
        while True:
            await asyncio.sleep(plane.registry.lifecycle.scan_interval_s)
            try:
                await self.rescan()
            except Exception:  # a refused layer (e.g. a name clash) keeps the running config
                log.exception("rescanning the model directories failed")

    async def _external_loop(self, plane: ControlPlane, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.external.tick(plane.registry, plane.state)
            except Exception:  # the loop must outlive a bug in one pass
                log.exception("computing the desired replicas of models with endpoints failed")

    def register_routes(self, app: FastAPI, dependencies: Sequence[Depends]) -> None:
        register_lifecycle_routes(
            app,
            self.manager,
            self.discovered,
            self.rescan,
            dependencies=dependencies,
            endpoint_models=lambda: self.external.overview(self._plane.registry),
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        await self.manager.close()
        await self.external.close()
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tasks[0], 5)
        await self.upstream.aclose()
