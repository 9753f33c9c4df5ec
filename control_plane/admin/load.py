"""Admin API: the load Envoys report over LRS (requests in flight per endpoint), read-only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.params import Depends

from control_plane.xds.lrs import LoadReportStore


def register_load_routes(
    app: FastAPI,
    store: LoadReportStore,
    *,
    prefix: str = "/admin/load",
    dependencies: Sequence[Depends] | None = None,
) -> FastAPI:
    """Mount `GET {prefix}` (everything the store holds) and `GET {prefix}/{address}` (one endpoint,
    `"ip:port"`). Pass the admin API's auth in `dependencies` (e.g. `[Depends(bearer_guard(token))]`).

    Returns `app`, so it can wrap `create_admin_app(...)` in place.
    """
    router = APIRouter(prefix=prefix, dependencies=list(dependencies or []), tags=["load"])

    @router.get("")
    def load() -> dict[str, Any]:
        return store.snapshot()

    @router.get("/{address}")
    def endpoint_load(address: str) -> dict[str, Any]:
        return {
            "address": address,
            "in_flight": store.in_flight(address),
            "in_flight_by_node": store.in_flight_by_node(address),
            "issued_total": store.issued_total(address),
            "successful_total": store.successful_total(address),
            "error_total": store.error_total(address),
            "fresh_nodes": sorted(store.fresh_nodes()),
        }

    app.include_router(router)
    return app
