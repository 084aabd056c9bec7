"""The management API's OpenAPI document and the page that browses it, offline.

Litestar's own pages load their scripts from CDNs: blank without Internet, and
each visit is announced to a third party. `/schema` (and `/schema/swagger`)
render Swagger UI from the copy in `gateway/static/swagger-ui/`, served by the
gateway itself at `/schema/swagger-ui/`; no other renderer is offered.
`/schema/openapi.json` is the document.
"""

from __future__ import annotations

import html
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from litestar import Request, Router
from litestar.datastructures import CacheControlHeader
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import OpenAPIRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router

ASSETS_PATH = "/schema/swagger-ui"
ASSETS_DIR = Path(__file__).parent / "static" / "swagger-ui"
# The name the document gives the bearer key of the management API.
SECURITY_SCHEME = "gatewayKey"
# An empty icon: the browser asks nobody for /favicon.ico.
_NO_FAVICON = '<link rel="icon" href="data:,">'


class OfflineSwaggerPlugin(OpenAPIRenderPlugin):
    """Swagger UI from the gateway's copy. Unlike Litestar's SwaggerRenderPlugin
    it needs no standalone preset and turns off the online spec validator,
    whose badge is an image from validator.swagger.io."""

    def __init__(self, *, path: str = "/swagger", assets: str = ASSETS_PATH) -> None:
        super().__init__(path=path, favicon=_NO_FAVICON)
        self.assets = assets

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = html.escape(str(openapi_schema["info"]["title"]))
        options = {
            "url": self.get_openapi_json_route(request),
            "dom_id": "#swagger-ui",
            "deepLinking": True,
            "validatorUrl": None,
        }
        # "</" cannot end the inline script early, whatever the URL holds.
        config = json.dumps(options).replace("</", "<\\/")
        return f"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>{title}</title>
    {self.favicon}
    <link rel="stylesheet" href="{self.assets}/swagger-ui.css">
    {self.style}
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="{self.assets}/swagger-ui-bundle.js"></script>
    <script>SwaggerUIBundle({config});</script>
  </body>
</html>
""".encode()


def openapi_config() -> OpenAPIConfig:
    """The document of the management API (the proxied OpenAI paths are
    OpenAI's to document), with its key declared: every documented operation
    is a `/v1/memories` one, so the requirement is set once for all."""
    scheme = SecurityScheme(
        type="http",
        scheme="bearer",
        description=(
            "The admin key (auth.admin_key) or a per-user gateway key. "
            "With no admin key configured, loopback clients need none."
        ),
    )
    return OpenAPIConfig(
        title="memory-gateway",
        version=version("memory-gateway"),
        description="Management API of memory-gateway's long-term memory.",
        render_plugins=[OfflineSwaggerPlugin()],
        components=Components(security_schemes={SECURITY_SCHEME: scheme}),
        security=[{SECURITY_SCHEME: []}],
    )


def swagger_ui_assets() -> Router:
    """Serves the Swagger UI copy; the files change only with the gateway."""
    return create_static_files_router(
        path=ASSETS_PATH,
        directories=[ASSETS_DIR],
        name="swagger-ui",
        cache_control=CacheControlHeader(max_age=86400),
        include_in_schema=False,
    )
