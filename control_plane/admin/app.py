"""Admin API (FastAPI): models and endpoints with their live state, and the changes an operator makes.

`/healthz` and `/metrics` are open (probes and Prometheus scrape them), so are the status page's shell
and `/docs`; everything else needs `Authorization: Bearer <ADMIN_TOKEN>`. Two pure ASGI gates run in
front of FastAPI: `AuthGate` checks the token from the headers before any body is read, `BodyGate`
bounds bodies to 1 MiB and refuses what is not storable JSON. Every refusal is a 4xx `{"detail": ...}`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, SecretStr

from control_plane.admin.auth import AuthGate, bearer_guard
from control_plane.admin.body import BodyGate
from control_plane.admin.docs import register_offline_docs
from control_plane.admin.operations import AdminOperations
from control_plane.admin.paths import PathGate
from control_plane.admin.views import Observers, endpoint_view, model_view
from control_plane.alerts.receiver import AlertReceiver, Notification, UnknownAlertError
from control_plane.config.schema import EndpointConfig, ModelConfig
from control_plane.errors import ConflictError, InvalidNameError, NotFoundError, RejectedChangeError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.watcher import ConfigWatcher

log = logging.getLogger(__name__)


def create_admin_app(
    plane: ControlPlane,
    metrics: ControlPlaneMetrics,
    watcher: ConfigWatcher | None,
    token: SecretStr,
    observers: Observers | None = None,
    links: Mapping[str, str | None] | None = None,
) -> FastAPI:
    """`links`: name → URL of tools the status page links to (e.g. `prometheus`, `alertmanager`)."""
    observers = observers or Observers()
    page_links = _http_links(links or {})
    ops = AdminOperations(plane, metrics)
    alerts = AlertReceiver(plane, ops, metrics)
    app = FastAPI(
        title="LLM gateway admin API",
        version="0.1.0",
        description="Models and endpoints of the gateway, their live state, and the changes operators make. "
        "Every change is persisted and pushed to every Envoy before the call returns.",
        docs_url=None,  # served by register_offline_docs, without a CDN
        redoc_url=None,
    )
    # Added innermost first: AuthGate runs before BodyGate, so no body is read without the token.
    app.add_middleware(PathGate)  # a control character in the path names nothing: 422 before routing
    app.add_middleware(BodyGate)
    app.add_middleware(AuthGate, token=token)
    register_offline_docs(app)

    # Typed errors → HTTP, here at the edge only. 422 for a name no model or endpoint can have (refused
    # before any lookup), a change that cannot be served (nothing of it was kept), an unknown alert.
    error_status = {
        NotFoundError: status.HTTP_404_NOT_FOUND,
        ConflictError: status.HTTP_409_CONFLICT,
        InvalidNameError: status.HTTP_422_UNPROCESSABLE_CONTENT,
        RejectedChangeError: status.HTTP_422_UNPROCESSABLE_CONTENT,
        UnknownAlertError: status.HTTP_422_UNPROCESSABLE_CONTENT,
    }

    async def typed_error(request: Request, exc: Exception) -> JSONResponse:
        code = next(error_status[t] for t in type(exc).__mro__ if t in error_status)  # subclasses too
        return JSONResponse({"detail": str(exc)}, status_code=code)

    for error_type in error_status:
        app.add_exception_handler(error_type, typed_error)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its stack; the client gets JSON, never a trace.
        log.error("admin API: %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the control plane's log"},
            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"])
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    admin = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(token))], tags=["admin"])

    def view(name: str) -> dict[str, Any]:
        return model_view(plane, observers, ops.model(name))

    @admin.get("/models")
    def list_models() -> dict[str, Any]:
        return {"models": [model_view(plane, observers, m) for m in plane.registry.models]}

    @admin.get("/models/{model:path}/endpoints")
    def list_model_endpoints(model: str) -> dict[str, Any]:
        return {"endpoints": view(model)["endpoints"]}

    @admin.post("/models/{model:path}/endpoints", status_code=status.HTTP_201_CREATED)
    async def add_endpoint(model: str, endpoint: EndpointConfig) -> dict[str, Any]:
        change = await ops.add_endpoint(model, endpoint)
        return {**get_endpoint(change.value), "sync": change.sync.as_json()}

    @admin.post("/models/{model:path}/enable")
    async def enable(model: str) -> dict[str, Any]:
        change = await ops.set_enabled(model, True)
        return {**view(change.value.id), "sync": change.sync.as_json()}

    @admin.post("/models/{model:path}/disable")
    async def disable(model: str) -> dict[str, Any]:
        change = await ops.set_enabled(model, False)
        return {**view(change.value.id), "sync": change.sync.as_json()}

    @admin.post("/models/{model:path}/drain")
    async def drain_model(model: str) -> dict[str, Any]:
        change = await ops.set_model_draining(model, True)
        return {**view(change.value.id), "sync": change.sync.as_json()}

    @admin.post("/models/{model:path}/undrain")
    async def undrain_model(model: str) -> dict[str, Any]:
        change = await ops.set_model_draining(model, False)
        return {**view(change.value.id), "sync": change.sync.as_json()}

    @admin.get("/models/{model:path}")
    def get_model(model: str) -> dict[str, Any]:
        return view(model)

    @admin.delete("/models/{model:path}")
    async def remove_model(model: str) -> dict[str, Any]:
        change = await ops.remove_model(model)
        return {"removed": change.value, "sync": change.sync.as_json()}

    @admin.post("/models", status_code=status.HTTP_201_CREATED)
    async def add_model(model: ModelConfig) -> dict[str, Any]:
        change = await ops.add_model(model)
        return {**view(change.value.id), "sync": change.sync.as_json()}

    @admin.get("/endpoints/{endpoint_id}")
    def get_endpoint(endpoint_id: str) -> dict[str, Any]:
        model, _ = ops.endpoint(endpoint_id)
        index = [model.endpoint_id(i) for i in range(len(model.endpoints))].index(endpoint_id)
        return {"model": model.id, **endpoint_view(plane, observers, model, index)}

    @admin.post("/endpoints/{endpoint_id}/drain")
    async def drain_endpoint(endpoint_id: str) -> dict[str, Any]:
        change = await ops.set_endpoint_draining(endpoint_id, True)
        return {**get_endpoint(endpoint_id), "sync": change.sync.as_json()}

    @admin.post("/endpoints/{endpoint_id}/undrain")
    async def undrain_endpoint(endpoint_id: str) -> dict[str, Any]:
        change = await ops.set_endpoint_draining(endpoint_id, False)
        alerts.forget_endpoint(endpoint_id)  # the operator's decision wins over a pending auto-undrain
        return {**get_endpoint(endpoint_id), "sync": change.sync.as_json()}

    @admin.delete("/endpoints/{endpoint_id}")
    async def remove_endpoint(endpoint_id: str) -> dict[str, Any]:
        change = await ops.remove_endpoint(endpoint_id)
        return {"removed": change.value, "sync": change.sync.as_json()}

    @admin.get("/status")
    def status_page() -> dict[str, Any]:
        return {
            "models": [model_view(plane, observers, m) for m in plane.registry.models],
            "envoys": [
                {
                    "node": node,
                    "streams": streams,
                    "version": snap.version if (snap := plane.cache.get_snapshot(node)) else None,
                    **plane.node_sync(node),  # synced, lagging, waiting_for, last_rejected
                }
                for node, streams in plane.connected_nodes().items()
            ],
            "config_error": watcher.last_error if watcher else None,
            "overlay_warnings": plane.applied.warnings,
            "links": page_links,
        }

    @admin.get("/audit")
    def audit(limit: int = 100) -> dict[str, Any]:
        return {"entries": plane.store.audit(min(max(limit, 1), 1000))}

    @admin.get("/alerts")
    def list_alerts(limit: int = 50) -> dict[str, Any]:
        return {
            "notifications": alerts.recent(min(max(limit, 1), 1000)),
            "auto_drain": sorted(alerts.auto_drain_alerts()),
            "pending_undrains": alerts.pending_undrains(),
        }

    @admin.put("/alerts/{alertname}/auto-drain")
    def set_auto_drain(alertname: str, setting: AutoDrainSetting) -> dict[str, Any]:
        alerts.set_auto_drain(alertname, setting.enabled)
        metrics.admin_actions.labels("alert.auto_drain").inc()
        return {"alertname": alertname, "auto_drain": alertname in alerts.auto_drain_alerts()}

    # Alertmanager's webhook receiver (configured with the same bearer token).
    @app.post("/alerts/webhook", tags=["alerts"], dependencies=[Depends(bearer_guard(token))])
    async def alert_webhook(notification: Notification) -> dict[str, Any]:
        return {"handled": await alerts.handle(notification)}

    app.include_router(admin)
    app.state.alerts = alerts
    return app


def _http_links(links: Mapping[str, str | None]) -> dict[str, str]:
    """Only http(s) URLs: the page puts them in `href`s, where a `javascript:` URL would run."""
    return {
        name: url
        for name, url in links.items()
        if url and urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc
    }


class AutoDrainSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool
