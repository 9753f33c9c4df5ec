"""Admin API: launched models' lifecycle (docs/lifecycle.md).

POST /admin/models/{id}/load      start it now (returns once it is ready, or 503 with why it failed)
POST /admin/models/{id}/unload    drain, then stop its engines
POST /admin/models/{id}/pin       never unloaded to make room (…/unpin undoes it)
POST /admin/models/{id}/replicas  {"count": n}: run n replicas (1..max_replicas); null: the policy decides
GET  /admin/lifecycle             every launched model's state, the budget, what the scan found, events
POST /admin/lifecycle/scan        rescan the model directories now
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field

from control_plane.lifecycle.manager import LifecycleError, LifecycleManager
from control_plane.lifecycle.registry_layer import DiscoveredModels


class ReplicaCount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(
        description="Replicas to run (1..max_replicas), kept until null returns the model to its policy."
    )


def _discovered(found: DiscoveredModels) -> list[dict[str, Any]]:
    return [
        {
            "id": f.model.id,
            "path": str(f.model.path),
            "format": f.model.format,
            "kind": f.model.kind.value if f.model.kind else None,
            "architecture": f.model.architecture,
            "size_bytes": f.model.size_bytes,
            "memory_mb": f.model.memory_mb,
            "launcher": f.launcher,
            "problem": f.model.problem,
        }
        for f in found.found
    ]


def register_lifecycle_routes(
    app: FastAPI,
    manager: LifecycleManager,
    discovered: DiscoveredModels,
    rescan: Callable[[], Awaitable[bool]],
    *,
    dependencies: Sequence[Depends],
    endpoint_models: Callable[[], dict[str, dict[str, Any]]] = dict,
) -> None:
    """`endpoint_models()`: the desired replicas of models with fixed endpoints (lifecycle/external.py)."""
    router = APIRouter(dependencies=list(dependencies), tags=["lifecycle"])

    def launched(model_id: str) -> str:
        if not manager.knows(model_id):
            raise HTTPException(
                404, f"no launched model {model_id!r} (a model with `launch`, or found by a scan)"
            )
        return model_id

    @router.post("/admin/models/{model_id}/load")
    async def load(model_id: str) -> dict[str, Any]:
        try:
            await manager.load(launched(model_id))
        except LifecycleError as exc:
            raise HTTPException(503, f"{exc.code}: {exc}") from None
        return {"id": model_id, **manager.status(model_id)}

    @router.post("/admin/models/{model_id}/unload")
    async def unload(model_id: str) -> dict[str, Any]:
        await manager.unload(launched(model_id), "admin")
        return {"id": model_id, **manager.status(model_id)}

    @router.post("/admin/models/{model_id}/pin")
    def pin(model_id: str) -> dict[str, Any]:
        manager.pin(launched(model_id), True)
        return {"id": model_id, **manager.status(model_id)}

    @router.post("/admin/models/{model_id}/unpin")
    def unpin(model_id: str) -> dict[str, Any]:
        manager.pin(launched(model_id), False)
        return {"id": model_id, **manager.status(model_id)}

    @router.post("/admin/models/{model_id}/replicas")
    def replicas(model_id: str, body: ReplicaCount) -> dict[str, Any]:
        try:
            manager.set_replicas(launched(model_id), body.count)
        except ValueError as exc:
            raise HTTPException(422, f"count: {exc}") from None
        return {"id": model_id, **manager.status(model_id)}

    @router.get("/admin/lifecycle")
    def overview() -> dict[str, Any]:
        return {
            "models": manager.statuses(),
            "budget": manager.budget(),
            "discovered": _discovered(discovered),
            "events": manager.events(),
            "endpoint_models": endpoint_models(),
        }

    @router.post("/admin/lifecycle/scan")
    async def scan() -> dict[str, Any]:
        changed = await rescan()
        return {"changed": changed, "discovered": _discovered(discovered)}

    app.include_router(router)
