"""Wire the control plane's parts together and run them until a signal stops them."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends
from pydantic import SecretStr

from control_plane.admin.app import create_admin_app
from control_plane.admin.audit import audited_file_reload
from control_plane.admin.auth import bearer_guard
from control_plane.admin.latency import PrometheusLatency
from control_plane.admin.load import register_load_routes
from control_plane.admin.status_page import register_status_page
from control_plane.admin.timeseries import TimeSeriesSampler
from control_plane.admin.views import Observers
from control_plane.config.loader import load_registry
from control_plane.config.schema import Registry
from control_plane.http_server import bind, embedded_server
from control_plane.lifecycle.wiring import LifecycleWiring
from control_plane.metrics import ControlPlaneMetrics
from control_plane.observability.file_sd import FileSdWriter
from control_plane.overload.wiring import OverloadWiring
from control_plane.runtime import EndpointGauges, HealthWiring, TelemetryWiring
from control_plane.service import ControlPlane
from control_plane.store.overlay import AdminStore
from control_plane.tenancy.usage import UsageSettings
from control_plane.tenancy.wiring import TenancyWiring
from control_plane.watcher import ConfigWatcher
from control_plane.xds.als import AccessLogServicer, LocalReplyCounter, add_als_servicer
from control_plane.xds.auth import XdsAuthenticator
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.generate_log import GenerateCounter
from control_plane.xds.lrs import LoadReportingServicer, LoadReportStore, add_lrs_servicer
from control_plane.xds.server import AdsServicer, create_grpc_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    config_path: Path
    admin_token: SecretStr
    xds_secret: SecretStr  # each Envoy's xDS credential is derived from it (xds/auth.py)
    state_db: Path = Path("var/gateway.db")
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    reload_interval_s: float = 1.0
    load_report_interval_s: float = 1.0
    prometheus_url: str | None = None  # a Prometheus scraping the Envoys: latency on the status page
    alertmanager_url: str | None = None  # linked from the status page
    file_sd_dir: Path | None = None  # where to write Prometheus file-SD targets of every model server
    allow_empty: bool = False  # serve a registry without models (else refused at start and on reload)
    usage_retention_days: int = 35  # usage per key and minute is kept this long
    usage_key_labels: int = 1000  # key names in Prometheus labels; further keys are `(other)`


async def serve(settings: ServeSettings) -> None:
    # ConfigError (invalid, empty, or not servable): refuse to start, the caller reports it.
    registry = load_registry(settings.config_path, allow_empty=settings.allow_empty)
    metrics = ControlPlaneMetrics.create()
    cache = SnapshotCache()
    store = AdminStore(settings.state_db)
    xds_auth = XdsAuthenticator(settings.xds_secret, metrics.registry)  # ADS, LRS and ALS alike
    load_store = LoadReportStore(interval_s=settings.load_report_interval_s)  # Envoys' LRS load reports
    # Launched models: the model directories are scanned before the plane's first registry.
    lifecycle = LifecycleWiring.create(
        registry,
        settings.config_path,
        Path(registry.lifecycle.log_dir or settings.state_db.parent / "engine-logs"),
        load_store,
        metrics.registry,
    )
    plane = ControlPlane(
        registry,
        cache=cache,
        metrics=metrics,
        store=store,
        allow_empty=settings.allow_empty,
        log_credential=xds_auth.log_token(),
        layer=lifecycle.discovered.layer,
    )
    metrics.registry.register(EndpointGauges(plane))
    watcher = ConfigWatcher(
        settings.config_path,
        audited_file_reload(plane, settings.config_path),  # audited with the actor "registry-file"
        metrics,
        settings.reload_interval_s,
        allow_empty=settings.allow_empty,
    )
    health = HealthWiring(plane, metrics)
    plane.add_registry_listener(health.follow)
    plane.add_launched_listener(health.launched_changed)  # launched replicas are probed too
    if settings.file_sd_dir is not None:
        # Prometheus discovers model servers from these files, admin-added ones and launched replicas
        # included.
        file_sd = FileSdWriter(settings.file_sd_dir)
        file_sd.write(plane.registry, plane.inputs.launched)

        async def write_targets(registry: Registry) -> None:
            file_sd.write(registry, plane.inputs.launched)

        def write_launched_targets() -> None:
            file_sd.write(plane.registry, plane.inputs.launched)

        plane.add_registry_listener(write_targets)
        plane.add_launched_listener(write_launched_targets)
    telemetry = TelemetryWiring.create(plane)
    # Saturation from telemetry → priority shedding and fallback switches; their counters and gauges.
    overload = OverloadWiring(plane, metrics.registry)
    if telemetry is not None:
        telemetry.listeners.append(overload.on_signals)

    grpc_server, xds_port = create_grpc_server(
        AdsServicer(cache, plane, metrics, xds_auth), f"{settings.xds_host}:{settings.xds_port}"
    )
    add_lrs_servicer(grpc_server, LoadReportingServicer(load_store, authenticator=xds_auth))
    # Errors Envoy answers itself, per model and code (its access-log stream, same credential check).
    local_replies = LocalReplyCounter(metrics, plane.registry)
    plane.add_registry_listener(local_replies.follow)
    # ...and every /v1/generate call, per model and scenario (same stream).
    generate_calls = GenerateCounter(metrics, plane.registry)
    plane.add_registry_listener(generate_calls.follow)
    # API keys (their table pushed over ECDS), the per-key request limit (RLQS on the same server) and
    # usage per key (a sink of the access-log stream, with the token limits it enforces).
    usage_settings = UsageSettings(settings.usage_retention_days, settings.usage_key_labels)
    tenancy = TenancyWiring.create(
        plane, settings.state_db, store, grpc_server, xds_auth, metrics, usage_settings
    )
    add_als_servicer(
        grpc_server,
        AccessLogServicer(
            [local_replies, generate_calls, overload.counters, *tenancy.sinks], authenticator=xds_auth
        ),
    )
    observers = Observers(
        prober=health.prober,
        loads=load_store,
        telemetry=telemetry.collector if telemetry else None,
        lifecycle=lifecycle.status_of,
    )
    links = {"prometheus": settings.prometheus_url, "alertmanager": settings.alertmanager_url}
    admin_app = create_admin_app(plane, metrics, watcher, settings.admin_token, observers, links)
    guard = Depends(bearer_guard(settings.admin_token))
    register_load_routes(admin_app, load_store, dependencies=[guard])
    lifecycle.register_routes(admin_app, dependencies=[guard])
    tenancy.register_routes(admin_app, dependencies=[guard])
    sampler = TimeSeriesSampler(
        plane,
        load_store,
        latency=PrometheusLatency(settings.prometheus_url) if settings.prometheus_url else None,
        engine=telemetry.collector if telemetry else None,  # TTFT and tokens/s from the engines' metrics
        local_errors=local_replies.unreported_errors,  # Envoy's own 5xx, which no load report has
    )
    register_status_page(admin_app, sampler=sampler, alerts=admin_app.state.alerts, guard_dependency=guard)
    admin_socket = bind(settings.admin_host, settings.admin_port)
    admin_port = admin_socket.getsockname()[1]
    admin = embedded_server(admin_app)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher.install_sighup(loop)

    await lifecycle.start(plane)  # before any Envoy connects: its first snapshot names the activator
    await grpc_server.start()
    await tenancy.start(plane)
    await health.follow(plane.registry)
    if telemetry is not None:
        telemetry.start()
    sampler.start()
    admin_task = asyncio.create_task(admin.serve(sockets=[admin_socket]))
    watch_task = asyncio.create_task(watcher.run())
    while not admin.started and not admin_task.done():
        await asyncio.sleep(0.01)
    print(f"READY xds={settings.xds_host}:{xds_port} admin={settings.admin_host}:{admin_port}", flush=True)
    log.info(
        "control plane: xDS on %s:%d, admin on %s:%d",
        settings.xds_host,
        xds_port,
        settings.admin_host,
        admin_port,
    )
    try:
        await stop.wait()
    finally:
        log.info("control plane stopping")
        watch_task.cancel()
        await sampler.stop()
        await health.close()
        if telemetry is not None:
            await telemetry.stop()
        admin.should_exit = True
        await lifecycle.stop()
        await grpc_server.stop(grace=1.0)
        await admin_task
        tenancy.close()
        store.close()
