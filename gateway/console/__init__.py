"""The web console at /ui: users and their memories, the extraction queue,
the store, and recent requests; server-rendered HTML (Jinja2), no script.

`console_router` is the one thing the app registers. Access, sessions and
CSRF: gateway/console/session.py; rendering and errors: pages.py; the pages:
routes.py; docs/console.md for operators.
"""

from __future__ import annotations

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.di import Provide
from litestar.static_files import create_static_files_router

from gateway.console.pages import STATIC, exception_handlers, provide_viewer
from gateway.console.routes import handlers

console_router = Router(
    path="/ui",
    route_handlers=[
        *handlers,
        create_static_files_router(
            path="/static",
            directories=[STATIC],
            name="console-static",
            cache_control=CacheControlHeader(max_age=3600),
            include_in_schema=False,
        ),
    ],
    dependencies={"viewer": Provide(provide_viewer)},
    exception_handlers=exception_handlers,
    include_in_schema=False,
)

__all__ = ["console_router"]
