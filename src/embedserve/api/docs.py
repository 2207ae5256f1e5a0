"""The API page, GET /docs: Swagger UI on the server's OpenAPI document, with its files served from an
installed package under /docs/assets/ (never a CDN), so the page works on a machine without internet.
Public, like /openapi.json; the page sends the key the user gives its Authorize dialog as a Bearer header."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import FileResponse, HTMLResponse

from embedserve.errors import RouteNotFound

#: Swagger UI's dist files as fastapi-offline ships them (Swagger UI 5: FastAPI's documents are
#: OpenAPI 3.1, which Swagger UI 4 refuses to render; design note 41).
ASSETS = Path(str(files("fastapi_offline") / "static"))
ASSETS_PATH = "/docs/assets"
#: The files the page loads, and nothing else of the package's folder.
_MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
#: validatorUrl off: Swagger UI's default validator is validator.swagger.io, a host off this server.
_SWAGGER_UI = {"validatorUrl": None}

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def docs_page(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy's prefix, as FastAPI's page
    assets = f"{root}{ASSETS_PATH}"
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
        oauth2_redirect_url=None,
        swagger_ui_parameters=_SWAGGER_UI,
    )


@router.get(ASSETS_PATH + "/{name}")
async def docs_asset(name: str) -> FileResponse:
    if name not in _MEDIA_TYPES:
        raise RouteNotFound(f"Unknown route: GET {ASSETS_PATH}/{name}")
    return FileResponse(ASSETS / name, media_type=_MEDIA_TYPES[name])
