"""Admin API: API keys (`/admin/keys`). Create, list, show, change, revoke and rotate.

The clear key appears in two answers only, `POST /admin/keys` (201) and `POST /admin/keys/{id}/rotate`,
as `key`; every other answer shows its `prefix` (the first 12 characters) and never its hash.
Typed errors map here: unknown id 404, an id no key can have 422, a taken name or a read-only (registry)
or revoked key 409, settings that cannot be kept 422, a change stored but not pushed to the gateways 503
(`stored`: the key, with the clear key when the call made one, so it is not lost).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request, status
from fastapi.params import Depends
from fastapi.responses import JSONResponse

from control_plane.tenancy.errors import KeyConflict, KeyIdInvalid, KeyInvalid, KeyNotFound, KeyPushError
from control_plane.tenancy.keys import ApiKey, KeyPatch, KeySettings
from control_plane.tenancy.service import KeyService


def register_key_routes(
    app: FastAPI,
    service: KeyService,
    *,
    prefix: str = "/admin/keys",
    dependencies: Sequence[Depends] | None = None,
) -> FastAPI:
    """Mount the key routes under `prefix`. Pass the admin API's auth in `dependencies` (e.g.
    `[Depends(bearer_guard(token))]`). Returns `app`, so it can wrap `create_admin_app(...)` in place."""
    router = APIRouter(prefix=prefix, dependencies=list(dependencies or []), tags=["keys"])

    def view(key: ApiKey, secret: str | None = None) -> dict[str, Any]:
        shown = key.view(service.now())
        return shown if secret is None else {**shown, "key": secret}

    @router.post("", status_code=status.HTTP_201_CREATED)
    async def create_key(settings: KeySettings) -> dict[str, Any]:
        """A new key. The answer's `key` is the clear key: the only time it is shown."""
        key, secret = await service.create(settings)
        return view(key, secret)

    @router.get("")
    def list_keys(include_revoked: bool = False) -> dict[str, Any]:
        return {
            "keys": [view(k) for k in service.list_keys(include_revoked)],
            "warnings": service.warnings,
        }

    @router.post("/{key_id:path}/rotate")
    async def rotate_key(key_id: str) -> dict[str, Any]:
        """A new clear key (`key`, shown this once) for the same key; the old one stops working."""
        key, secret = await service.rotate(key_id)
        return view(key, secret)

    @router.get("/{key_id:path}")
    def get_key(key_id: str) -> dict[str, Any]:
        return view(service.get(key_id))

    @router.patch("/{key_id:path}")
    async def update_key(key_id: str, patch: KeyPatch) -> dict[str, Any]:
        """Only the fields given change; null clears one (no limit, every model, default priority)."""
        return view(await service.update(key_id, patch))

    @router.delete("/{key_id:path}")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        """Revoke: the key stops working, its record stays (`revoked_at`) for its usage history."""
        return view(await service.revoke(key_id))

    error_status = {
        KeyIdInvalid: status.HTTP_422_UNPROCESSABLE_CONTENT,
        KeyNotFound: status.HTTP_404_NOT_FOUND,
        KeyConflict: status.HTTP_409_CONFLICT,
        KeyInvalid: status.HTTP_422_UNPROCESSABLE_CONTENT,
    }

    async def key_error(request: Request, exc: Exception) -> JSONResponse:
        code = next(error_status[t] for t in type(exc).__mro__ if t in error_status)
        return JSONResponse({"detail": str(exc)}, status_code=code)

    async def push_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, KeyPushError)
        return JSONResponse(
            {"detail": str(exc), "stored": view(exc.record, exc.secret)},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    for error_type in error_status:
        app.add_exception_handler(error_type, key_error)
    app.add_exception_handler(KeyPushError, push_error)
    app.include_router(router)
    return app
