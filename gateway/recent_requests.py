"""The last chat requests this process served, for the console's live view.

Only what an operator needs to see at a glance is kept (API, model, status,
memory status, how many memories went in); the user is kept so the operator
can open a row, never the messages or any key. Each serving process keeps
its own ring (the console shows the process that answered it), bounded so
it costs the same whatever the traffic.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

DEFAULT_SIZE = 200


@dataclass(frozen=True, slots=True)
class RequestRecord:
    id: int
    at: float  # Unix time the request arrived
    path: str  # "/v1/chat/completions", "/v1/responses", "/v1/messages"
    model: str
    upstream: str  # the upstream entry's name, "" when none was picked
    status: int  # the HTTP status sent to the client
    memory_status: str  # X-Memory-Status as sent ("ok", "degraded", "off", ...)
    injected: int  # memories injected into the request
    stream: bool
    user_id: str | None  # None: no user named (memory off for it)
    duration_ms: float


class RecentRequests:
    """A ring of the newest records; appends and reads are O(1) and O(n)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._ring: collections.deque[RequestRecord] = collections.deque(maxlen=size)
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, record: RequestRecord) -> None:
        self._ring.append(record)

    def latest(self, limit: int = 50) -> list[RequestRecord]:
        """Newest first."""
        return list(itertools.islice(reversed(self._ring), max(0, limit)))

    def get(self, record_id: int) -> RequestRecord | None:
        return next((r for r in self._ring if r.id == record_id), None)
