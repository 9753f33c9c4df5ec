"""The status page: models, endpoints, traffic charts and recent alerts, live, for a person in a browser.

`GET /` serves one static file (`static/status.html`: HTML, CSS and JS inline, no external resource, no
build step). It holds no data and no secret, so it is served without authentication: a browser cannot
attach a bearer token to a navigation. The page asks for the admin token once, or takes it from the URL
fragment (`/#token=…`, which never reaches a server), keeps it in the tab's session storage, and polls
the admin API with `Authorization: Bearer`:

- `GET /admin/status`: models, endpoints (health, weight, drain state, in flight), Envoys (admin app);
- `GET /admin/timeseries`: the sampler's window of per-model QPS, errors, in flight, latency (here);
- `GET /admin/status/alerts`: the alerts most recently received (here);
- `GET /admin/lifecycle`: launched models' states, the memory budget and the last lifecycle events
  (admin/lifecycle.py); a failed read shows in that box only.

The page is served with a Content-Security-Policy that allows its own inline script and style (by hash)
and requests to this origin only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import re
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, FastAPI, Query, Response
from fastapi.encoders import jsonable_encoder
from fastapi.params import Depends

from control_plane.admin.timeseries import TimeSeriesSampler

log = logging.getLogger(__name__)

PAGE_RESOURCE = "static/status.html"


class RecentAlerts(Protocol):
    """The alert receiver, as far as the page needs it: the latest notifications, newest first.

    Each item: `received_at` (unix seconds), `status` ("firing" | "resolved"), `alertname`, `labels`,
    `annotations` (dicts of strings), `action` (what the gateway did about it, e.g. "drained qwen2-0"; None).
    """

    def recent(self, limit: int = 50) -> list[dict[str, Any]]: ...


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(html: str) -> str:
    """A CSP allowing exactly the page's inline `<script>` and `<style>` blocks, and fetches to itself."""
    scripts = " ".join(_sha256(body) for body in re.findall(r"<script>(.*?)</script>", html, re.S))
    styles = " ".join(_sha256(body) for body in re.findall(r"<style>(.*?)</style>", html, re.S))
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {scripts}",
            f"style-src {styles}",
            "img-src data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@functools.cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and the headers it is served with (read once)."""
    html = resources.files("control_plane.admin").joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        "Cache-Control": "no-cache",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
    }
    return html.encode(), headers


def _received_at(alert: dict[str, Any]) -> float:
    value = alert.get("received_at")
    return float(value) if isinstance(value, int | float) else 0.0


def register_status_page(
    app: FastAPI,
    *,
    sampler: TimeSeriesSampler | None,
    alerts: RecentAlerts | None,
    guard_dependency: Depends | Callable[..., Any],
) -> FastAPI:
    """Mount `GET /` (the page, open) and, behind `guard_dependency` (e.g. `bearer_guard(token)` or
    `Depends(bearer_guard(token))`), `GET /admin/timeseries` and `GET /admin/status/alerts`.

    `sampler`: its window feeds the charts (None: no history, the charts say so). `alerts`: any object
    with `recent(limit)` (None: the page shows "Alerting not configured"). Returns `app`.
    """
    guard = guard_dependency if isinstance(guard_dependency, Depends) else Depends(guard_dependency)

    @app.get("/", include_in_schema=False)
    def status_page() -> Response:
        body, headers = page()
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    router = APIRouter(prefix="/admin", dependencies=[guard], tags=["status page"])

    @router.get("/timeseries")
    async def timeseries(
        window_s: Annotated[
            float | None, Query(gt=0, description="only the last seconds of the window")
        ] = None,
    ) -> dict[str, Any]:
        """Per-model QPS, error ratio, in flight (and latency with a Prometheus source), as columns."""
        # async: read on the event loop, where the sampler writes (no thread in between).
        if sampler is None:
            return {"interval_s": None, "window_s": None, "now": None, "latency": None, "t": [], "models": {}}
        return sampler.to_json(window_s)

    @router.get("/status/alerts")
    def recent_alerts(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        """The alerts received most recently, newest first."""
        if alerts is None:
            return {"configured": False, "alerts": [], "error": None}
        try:
            items = list(alerts.recent(limit))
        except Exception as exc:
            log.exception("status page: could not read the recent alerts")
            return {"configured": True, "alerts": [], "error": f"{type(exc).__name__}: {exc}"}
        items.sort(key=_received_at, reverse=True)
        return {"configured": True, "alerts": jsonable_encoder(items[:limit]), "error": None}

    app.include_router(router)
    return app
