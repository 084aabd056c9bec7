"""How extraction is going, as any process of the gateway sees it.

The job-running process knows its extractor, but a chat's status header and
`GET /v1/memories/stats` are answered by serving processes: so the status is
read from what every process shares, the spool (the outcomes of recent jobs)
and the extractor's state file (the model and the output mode it learned).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from memory.config import MemoryConfig
from memory.extraction import Extractor
from memory.extraction_keys import ExtractionKeys
from memory.extraction_state import SavedState, read_state
from memory.models import ExtractionStatus, LastError
from memory.redaction import public_url
from memory.spools import JobQueue

log = logging.getLogger("memory.extraction_status")

# How often a serving process reads the extraction status from the spool for
# the `X-Memory-Status` header (seconds)...
STATUS_CACHE_SECONDS = 1.0
# ...and stops reading it after this long without a chat asking.
STATUS_IDLE_SECONDS = 60.0


class ExtractionMonitor:
    """The `extraction` section of the stats, and the failing flag of chats."""

    def __init__(
        self,
        config: MemoryConfig,
        spool: JobQueue,
        extractor: Extractor,
        keys: ExtractionKeys,
        *,
        key_source: str | None,
        state_path: Path | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._spool = spool
        self._extractor = extractor
        self._keys = keys
        self._key_source = key_source
        self._state_path = state_path
        # Seconds, for when chats asked (tests pass their own).
        self._clock = clock
        # The last reading for chat headers, and when a chat last asked.
        self._failing = False
        self._asked = float("-inf")
        self._refresh: asyncio.Task[None] | None = None
        self._closed = False

    async def status(self) -> ExtractionStatus:
        """The endpoint, what was learned about it, and how its jobs went."""
        window = self._config.llm.failing_window_seconds
        outcomes, reasons, state = await asyncio.gather(
            self._spool.outcomes(window), self._spool.reasons(), self._saved_state()
        )
        self._failing = outcomes.failing
        endpoint = public_url(self._extractor.base_url)
        model = self._extractor.model
        mode = self._extractor.mode()
        if state is not None and state.endpoint == endpoint:
            model = state.model or model
            mode = state.modes.get(model) or mode
        if outcomes.failing:
            status: Literal["ok", "failing", "idle"] = "failing"
        elif outcomes.last_success_at is None and outcomes.last_error_at is None:
            status = "idle"
        else:
            status = "ok"
        last_error = None
        if outcomes.last_error is not None and outcomes.last_error_at is not None:
            last_error = LastError(
                message=outcomes.last_error,
                reason=outcomes.last_error_reason,
                at=_when(outcomes.last_error_at),
            )
        return ExtractionStatus(
            endpoint=endpoint,
            model=model,
            mode=mode,
            key_source=self._shown_key_source(),
            status=status,
            last_success_at=_when(outcomes.last_success_at) if outcomes.last_success_at else None,
            last_error=last_error,
            jobs_by_reason=reasons,
        )

    async def _saved_state(self) -> SavedState | None:
        if self._state_path is None:
            return None
        return await asyncio.to_thread(read_state, self._state_path)

    def _shown_key_source(self) -> str | None:
        probed = self._extractor.probed
        if not self._keys.configured and probed is not None and probed.open:
            return "none needed: the endpoint answers without a key (a key a user sends is used)"
        return self._key_source

    def failing(self) -> bool:
        """Whether extraction is failing, for a chat's status header. A chat
        never waits on the spool for it: it reads what a background task
        keeps at most STATUS_CACHE_SECONDS old, while chats ask (the task
        starts with the first ask and rests after a minute without one)."""
        self._asked = self._clock()
        if not self._closed and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._keep(), name="extraction-status")
        return self._failing

    async def _keep(self) -> None:
        while self._clock() - self._asked < STATUS_IDLE_SECONDS:
            try:
                outcomes = await self._spool.outcomes(self._config.llm.failing_window_seconds)
            except Exception:
                log.exception("reading the extraction status failed")
            else:
                self._failing = outcomes.failing
            await asyncio.sleep(STATUS_CACHE_SECONDS)

    async def close(self) -> None:
        self._closed = True
        refresh, self._refresh = self._refresh, None
        if refresh is not None:
            refresh.cancel()
            await asyncio.gather(refresh, return_exceptions=True)


def _when(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)
