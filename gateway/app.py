"""The Litestar application: routes, OpenAI-shaped errors, and one shared upstream client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from gateway.config import Config
from gateway.errors import exception_handlers
from gateway.hooks import ChatHooks, NoHooks
from gateway.proxy import Proxy
from gateway.routes import handlers
from gateway.tasks import BackgroundTasks

logger = logging.getLogger("gateway")

# After-completion work still running at shutdown gets this long to finish.
DRAIN_SECONDS = 10.0


def create_app(config: Config, *, hooks: ChatHooks | None = None) -> Litestar:
    hooks = hooks if hooks is not None else NoHooks()
    tasks = BackgroundTasks()
    proxy = Proxy(config, hooks, tasks)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await proxy.start()
        app.state.client = proxy.client
        try:
            await hooks.startup()
            try:
                yield
            finally:
                await tasks.drain(DRAIN_SECONDS)
                await hooks.shutdown()
        finally:
            await proxy.close()

    app = Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        request_max_body_size=config.server.max_body_bytes,
        openapi_config=None,
        debug=False,
    )
    app.state.config = config
    app.state.proxy = proxy
    app.state.hooks = hooks
    app.state.tasks = tasks
    return app
