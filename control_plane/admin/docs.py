"""`/docs` without the internet: Swagger UI's assets are served by the control plane itself.

FastAPI's default `/docs` page loads Swagger UI from a CDN, so it is blank on a machine without internet
access (a common place for a control plane). The assets come from the `fastapi-offline` package (MIT;
Swagger UI itself is Apache-2.0) and are served under `/docs/assets/`, read once.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import FastAPI, HTTPException, Response
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

ASSETS_URL = "/docs/assets"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}


@functools.cache
def asset(name: str) -> bytes:
    return resources.files("fastapi_offline").joinpath("static", name).read_bytes()


def register_offline_docs(app: FastAPI) -> FastAPI:
    """Mount `GET /docs` (Swagger UI), its OAuth2 redirect page and its assets. Create the app with
    `docs_url=None, redoc_url=None` so FastAPI's CDN pages are not mounted as well."""
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} · docs",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": False},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(f"{ASSETS_URL}/{{name}}", include_in_schema=False)
    def docs_asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, detail=f"no asset {name!r}")
        return Response(asset(name), media_type=media_type, headers={"Cache-Control": "max-age=86400"})

    return app
