"""The API's own documentation, served with no network: ``/docs`` (Swagger UI) and ``/redoc``.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so offline they are blank. Here
their scripts and styles come from the installed ``fastapi-offline`` package (a dependency of
the ``api`` extra) on local routes under :data:`ASSETS`, which, like the pages, need no token.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS", "DOC_PATHS", "add_docs"]

#: where the Swagger UI and ReDoc files are served from
ASSETS = "/docs-assets"
#: the documentation pages (served without a token)
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def add_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/redoc`` from local assets; ``app`` must be built with
    ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not added as well."""
    static = files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(static)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - Swagger UI", oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{ASSETS}/redoc.standalone.js", redoc_favicon_url=f"{ASSETS}/favicon.png",
                              with_google_fonts=False)
