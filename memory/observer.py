"""What the engine tells its host about extraction as it happens.

The engine counts nothing itself and imports no metrics library: the
gateway passes an `Observer` that turns these calls into Prometheus metrics
(gateway/metrics.py). Calls are made on the event loop, must be quick and
must not raise.
"""

from __future__ import annotations

from collections.abc import Sequence

from memory.models import Operation


class Observer:
    """The default observer notices nothing."""

    def llm_tokens(self, prompt: int, completion: int) -> None:
        """One extraction call's token usage, as the model server reported it."""

    def operations_applied(self, ops: Sequence[Operation]) -> None:
        """A job's decision, once applied; an empty one changed nothing (NONE)."""


NO_OBSERVER = Observer()
