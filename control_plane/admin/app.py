"""Admin API: health, Prometheus metrics and control-plane status.

The model/endpoint management resources (enable, drain, …) build on this app.
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control_plane.metrics import ControlPlaneMetrics
from control_plane.service import ControlPlane
from control_plane.watcher import ConfigWatcher


def create_admin_app(
    plane: ControlPlane, metrics: ControlPlaneMetrics, watcher: ConfigWatcher | None
) -> FastAPI:
    app = FastAPI(title="LLM gateway admin API", version="0.1.0")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/status")
    def status() -> dict[str, object]:
        return {
            "models": [
                {
                    "id": m.id,
                    "enabled": m.enabled,
                    "endpoints": [
                        {"id": e.id, "address": f"{e.address}:{e.port}", "health": e.health}
                        for e in m.endpoints
                    ],
                }
                for m in plane.state.models
            ],
            "envoys": [
                {
                    "node": node,
                    "streams": streams,
                    "version": snap.version if (snap := plane.cache.get_snapshot(node)) else None,
                }
                for node, streams in plane.connected_nodes().items()
            ],
            "config_error": watcher.last_error if watcher else None,
        }

    return app
