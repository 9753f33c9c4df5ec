"""Admin API (FastAPI): models and endpoints with their live state, and the changes an operator makes.

`/healthz` and `/metrics` are open (probes and Prometheus scrape them); everything under `/admin` needs
`Authorization: Bearer <ADMIN_TOKEN>`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, SecretStr

from control_plane.admin.auth import bearer_guard
from control_plane.admin.operations import AdminOperations
from control_plane.admin.views import Observers, endpoint_view, model_view
from control_plane.alerts.receiver import AlertReceiver, Notification
from control_plane.config.schema import EndpointConfig, ModelConfig
from control_plane.errors import ConflictError, NotFoundError
from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.watcher import ConfigWatcher


def create_admin_app(
    plane: ControlPlane,
    metrics: ControlPlaneMetrics,
    watcher: ConfigWatcher | None,
    token: SecretStr,
    observers: Observers | None = None,
) -> FastAPI:
    observers = observers or Observers()
    ops = AdminOperations(plane, metrics)
    alerts = AlertReceiver(plane, ops, metrics)
    app = FastAPI(
        title="LLM gateway admin API",
        version="0.1.0",
        description="Models and endpoints of the gateway, their live state, and the changes operators make. "
        "Every change is persisted and pushed to every Envoy before the call returns.",
    )

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(ConflictError)
    async def conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"])
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    admin = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(token))], tags=["admin"])

    def view(name: str) -> dict[str, Any]:
        model = plane.registry.model(name)
        if model is None:
            raise NotFoundError(f"no model {name!r}")
        return model_view(plane, observers, model)

    @admin.get("/models")
    def list_models() -> dict[str, Any]:
        return {"models": [model_view(plane, observers, m) for m in plane.registry.models]}

    @admin.get("/models/{model:path}/endpoints")
    def list_model_endpoints(model: str) -> dict[str, Any]:
        return {"endpoints": view(model)["endpoints"]}

    @admin.post("/models/{model:path}/endpoints", status_code=status.HTTP_201_CREATED)
    async def add_endpoint(model: str, endpoint: EndpointConfig) -> dict[str, Any]:
        endpoint_id = await ops.add_endpoint(model, endpoint)
        return get_endpoint(endpoint_id)

    @admin.post("/models/{model:path}/enable")
    async def enable(model: str) -> dict[str, Any]:
        return view((await ops.set_enabled(model, True)).id)

    @admin.post("/models/{model:path}/disable")
    async def disable(model: str) -> dict[str, Any]:
        return view((await ops.set_enabled(model, False)).id)

    @admin.post("/models/{model:path}/drain")
    async def drain_model(model: str) -> dict[str, Any]:
        return view((await ops.set_model_draining(model, True)).id)

    @admin.post("/models/{model:path}/undrain")
    async def undrain_model(model: str) -> dict[str, Any]:
        return view((await ops.set_model_draining(model, False)).id)

    @admin.get("/models/{model:path}")
    def get_model(model: str) -> dict[str, Any]:
        return view(model)

    @admin.delete("/models/{model:path}", status_code=status.HTTP_204_NO_CONTENT)
    async def remove_model(model: str) -> None:
        await ops.remove_model(model)

    @admin.post("/models", status_code=status.HTTP_201_CREATED)
    async def add_model(model: ModelConfig) -> dict[str, Any]:
        return view((await ops.add_model(model)).id)

    @admin.get("/endpoints/{endpoint_id}")
    def get_endpoint(endpoint_id: str) -> dict[str, Any]:
        model, _ = ops.endpoint(endpoint_id)
        index = [model.endpoint_id(i) for i in range(len(model.endpoints))].index(endpoint_id)
        return {"model": model.id, **endpoint_view(plane, observers, model, index)}

    @admin.post("/endpoints/{endpoint_id}/drain")
    async def drain_endpoint(endpoint_id: str) -> dict[str, Any]:
        await ops.set_endpoint_draining(endpoint_id, True)
        return get_endpoint(endpoint_id)

    @admin.post("/endpoints/{endpoint_id}/undrain")
    async def undrain_endpoint(endpoint_id: str) -> dict[str, Any]:
        await ops.set_endpoint_draining(endpoint_id, False)
        alerts.forget_endpoint(endpoint_id)  # the operator's decision wins over a pending auto-undrain
        return get_endpoint(endpoint_id)

    @admin.delete("/endpoints/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def remove_endpoint(endpoint_id: str) -> None:
        await ops.remove_endpoint(endpoint_id)

    @admin.get("/status")
    def status_page() -> dict[str, Any]:
        return {
            "models": [model_view(plane, observers, m) for m in plane.registry.models],
            "envoys": [
                {
                    "node": node,
                    "streams": streams,
                    "version": snap.version if (snap := plane.cache.get_snapshot(node)) else None,
                }
                for node, streams in plane.connected_nodes().items()
            ],
            "config_error": watcher.last_error if watcher else None,
            "overlay_warnings": plane.applied.warnings,
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


class AutoDrainSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool
