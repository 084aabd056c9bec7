"""`GET /metrics`: the Prometheus exposition, for the admin key, a local
client (as the management API), or the scrape-only `metrics.key`."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from litestar import Request, Response, get

from gateway.errors import GatewayError
from gateway.identity import bearer_token
from gateway.memories_access import Access, admin_only
from gateway.metrics import CONTENT_TYPE, Metrics, StateGauges

logger = logging.getLogger("gateway.metrics")


def _authorize(request: Request[Any, Any, Any]) -> None:
    key: str | None = request.app.state.config.metrics.key
    token = bearer_token(request.headers.get("authorization"))
    if key and token is not None and hmac.compare_digest(token.encode(), key.encode()):
        return
    access: Access = request.app.state.memory_access
    admin_only(access.principal(request))


async def _state(request: Request[Any, Any, Any]) -> StateGauges | None:
    """The spool's and the store's numbers; None while memory is off or unopened."""
    hooks = request.app.state.hooks
    engine = getattr(hooks, "opened", None)
    if engine is None:
        return None
    try:
        spool, rows, failing = await asyncio.gather(
            engine.spool.stats(), engine.store.count(), engine.extraction_status()
        )
    except Exception:
        # A scrape still returns the request metrics; the state gauges are absent.
        logger.exception("reading the spool and store for /metrics failed")
        return None
    return StateGauges(
        jobs={
            "pending": spool.pending,
            "running": spool.running,
            "failed": spool.failed,
            "done": spool.done,
        },
        lag_seconds=spool.lag_seconds,
        rows=rows,
        extraction_failing=failing.status == "failing",
    )


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    metrics: Metrics | None = request.app.state.metrics
    if metrics is None:
        raise GatewayError(404, "metrics are off (metrics.enabled: false)", code="not_found")
    _authorize(request)
    state = await _state(request)
    body = await asyncio.to_thread(metrics.render, state)
    return Response(content=body, media_type=CONTENT_TYPE)
