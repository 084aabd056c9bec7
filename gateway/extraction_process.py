"""The extraction process (`server.extraction: process`): the spool's jobs
and the store's maintenance, beside the serving processes.

Extraction of an exchange (related-memory search, the LLM call, the store
write) is CPU work on the event loop. Run inside a serving process it delays
the next requests; here it has a process, and with two cores a core, of its
own. The serving processes spool each exchange and send a wake-up with the
user's key (bring-your-own-key) over the supervisor's socketpair
(memory/handoff.py); the spool's leases make a job exactly-once whoever
claims it.

No HTTP server and no Litestar here: only the memory engine, imported in
the process itself so that the supervisor, which names this module's entry
point, stays small.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gateway.config import Config
from gateway.logs import setup_logging
from gateway.supervisor import name_process, watch_parent
from memory.heap import freeze_startup_objects, tune_process_heap

if TYPE_CHECKING:
    import httpx

    from gateway.chat_activity import Counters
    from memory.engine import MemoryEngine

logger = logging.getLogger("gateway.extraction")


def run_extraction(
    config: Config,
    handoff: socket.socket,
    supervisor: int,
    chat_counters: Counters | None = None,
) -> None:
    """Process entry point (spawned by the supervisor). `chat_counters`: the
    serving workers' chat requests in flight, which extraction calls yield to."""
    tune_process_heap()
    name_process("mg-extraction")
    setup_logging(config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        status = asyncio.run(_extract(config, handoff, supervisor, chat_counters))
    else:
        status = uvloop.run(_extract(config, handoff, supervisor, chat_counters))
    sys.exit(status)


async def _extract(
    config: Config, handoff: socket.socket, supervisor: int, chat_counters: Counters | None
) -> int:
    """Run until SIGTERM (or the supervisor is gone); the exit status."""
    from gateway.transport import upstream_client

    # The extraction model's calls go through the gateway's upstream client.
    client = upstream_client(config.http)
    try:
        return await _extract_with(config, handoff, supervisor, client, chat_counters)
    finally:
        await client.aclose()


async def _extract_with(
    config: Config,
    handoff: socket.socket,
    supervisor: int,
    client: httpx.AsyncClient,
    chat_counters: Counters | None = None,
) -> int:
    from gateway.chat_activity import ChatActivity, yield_gate
    from gateway.metrics import Metrics
    from memory.engine import MemoryEngine
    from memory.handoff import HandoffReceiver
    from memory.observer import NO_OBSERVER

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    def orphaned() -> None:
        loop.call_soon_threadsafe(stopping.set)

    watch_parent(supervisor, stop=orphaned)
    receiver = HandoffReceiver(handoff)
    # Reads the serving workers' counts (this process sends no chat requests).
    gate = yield_gate(config, ChatActivity.for_config(config, chat_counters))

    async def open_engine() -> MemoryEngine:
        return await MemoryEngine.open(
            config.memory,
            config.data_path,
            storage=config.storage,
            queue=config.queue,
            default_base_url=config.default_upstream.base_url,
            http_client=client,
            extraction_key=config.extraction.api_key,
            key_source=config.extraction.key_source,
            call_gate=gate,
            observer=Metrics().observer() if config.metrics.enabled else NO_OBSERVER,
        )

    opening = asyncio.ensure_future(_open(open_engine))
    stopped = asyncio.ensure_future(stopping.wait())
    await asyncio.wait([opening, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not opening.done():
        opening.cancel()
        return 0
    stopped.cancel()
    engine = opening.result()
    if engine is None:
        return 3  # not something waiting fixes: the supervisor gives up after 3
    guard: asyncio.Task[None] | None = None
    try:
        receiver.start(engine.receive)
        await engine.start()
        freeze_startup_objects()
        guard = _guard_priority(config, engine)
        logger.info("extraction process ready")
        await stopping.wait()
    finally:
        receiver.close()
        if guard is not None:
            guard.cancel()
        # Running jobs go back to the spool; another start takes them up.
        await engine.close()
    return 0


def _guard_priority(config: Config, engine: MemoryEngine) -> asyncio.Task[None] | None:
    """Background CPU priority from here on (gateway/priority.py): start-up,
    which nothing waits behind, ran at normal priority to be ready sooner."""
    from gateway.priority import PriorityGuard, background_supported

    max_lag = config.server.extraction_max_lag_seconds
    if max_lag <= 0:
        return None
    if not background_supported():
        logger.info("no idle CPU priority on this system: extraction runs at normal priority")
        return None
    return asyncio.ensure_future(PriorityGuard(engine.extraction_lag, max_lag).run())


async def _open(open_engine: Callable[[], Awaitable[MemoryEngine]]) -> MemoryEngine | None:
    """Open the engine; while the embedder is unreachable, keep trying."""
    from memory.engine import open_when_possible
    from memory.errors import TRANSIENT

    try:
        return await open_engine()
    except TRANSIENT as exc:
        logger.error(
            "memory is unavailable, extraction waits and retries: %s: %s",
            type(exc).__name__,
            str(exc)[:300],
        )
    return await open_when_possible(open_engine)
