"""The Litestar application: routes, OpenAI-shaped errors, and one shared upstream client."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from gateway.chat_activity import ChatActivity, yield_gate
from gateway.config import Config
from gateway.console import console_router
from gateway.errors import exception_handlers
from gateway.hooks import ChatHooks, NoHooks
from gateway.key_store import KeyStore
from gateway.keys_api import KeysController
from gateway.logs import logging_config
from gateway.mcp_server import MemoryTools, create_mcp_server, mcp_route, running
from gateway.mem0_api import mem0_router
from gateway.memories_access import Access
from gateway.memories_api import MemoriesController
from gateway.memory_hooks import MemoryHooks
from gateway.metrics import Metrics
from gateway.metrics_api import metrics_endpoint
from gateway.observe import RequestObserver
from gateway.openapi import openapi_config, swagger_ui_assets
from gateway.proxy import Proxy
from gateway.recent_requests import RecentRequests
from gateway.routes import handlers
from memory.handoff import HandoffSender
from memory.heap import freeze_startup_objects

logger = logging.getLogger("gateway")


def create_app(
    config: Config,
    *,
    hooks: ChatHooks | None = None,
    handoff: HandoffSender | None = None,
    activity: ChatActivity | None = None,
    owns_process: bool = False,
) -> Litestar:
    """The gateway; by default with the memory engine behind the chat seams
    (`memory.enabled: false` makes it a plain proxy). With `handoff`, spooled
    exchanges are extracted by the extraction process at its other end.
    `owns_process` (`memory-gateway serve`): once started, the process's
    objects are frozen out of garbage collection (`freeze_startup_objects`),
    which an app embedded in another program must not impose on it.
    `activity`: the chat requests in flight, shared with the gateway's other
    processes (gateway/chat_activity.py); without it, this process's own."""
    if activity is None:
        activity = ChatActivity.for_config(config)
    metrics = Metrics() if config.metrics.enabled else None
    if hooks is None:
        if config.memory.enabled:
            memory = MemoryHooks(
                config, handoff, upstream_client=lambda: proxy.client, metrics=metrics
            )
            # Extraction run in this process yields to the chats counted here
            # and in the other serving workers.
            memory.call_gate = yield_gate(config, activity)
            hooks = memory
        else:
            hooks = NoHooks()
    issued_keys = KeyStore(config.data_path, config.auth.keys_secret, queue_url=config.queue.url)
    proxy = Proxy(config, hooks, activity, issued_keys, metrics)
    access = Access(config.auth.admin_key, proxy.identity.keys)
    mcp_handlers = []
    mcp = None
    if isinstance(hooks, MemoryHooks):
        memory_hooks = hooks
        tools = MemoryTools(lambda: memory_hooks.opened, access, proxy.identity)
        mcp = create_mcp_server(tools)
        mcp_handlers.append(mcp_route(mcp, tools))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await proxy.start()
        app.state.client = proxy.client
        await issued_keys.start()
        try:
            await hooks.startup()
            if owns_process:
                freeze_startup_objects()
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if mcp is not None:
                        await stack.enter_async_context(running(mcp))
                    yield
            finally:
                await hooks.shutdown()
        finally:
            await issued_keys.close()
            await proxy.close()

    app = Litestar(
        route_handlers=[
            *handlers,
            MemoriesController,
            KeysController,
            metrics_endpoint,
            mem0_router,
            console_router,
            *mcp_handlers,
            swagger_ui_assets(),
        ],
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        request_max_body_size=config.server.max_body_bytes,
        # Documents the management API; the proxied OpenAI paths are OpenAI's to document.
        openapi_config=openapi_config(),
        debug=False,
        logging_config=logging_config(config),
    )
    recent = RecentRequests()
    # Every request is counted and timed, whatever answers it (router, error handlers).
    app.asgi_handler = RequestObserver(app.asgi_handler, metrics, recent)
    app.state.config = config
    app.state.metrics = metrics
    app.state.recent_requests = recent
    app.state.proxy = proxy
    app.state.chat_activity = activity
    app.state.hooks = hooks
    app.state.memory_access = access
    app.state.issued_keys = issued_keys
    return app
