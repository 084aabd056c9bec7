"""Which key each user's extraction jobs send to the extraction endpoint (BYOK).

With a key configured for the endpoint (`memory.llm.api_key`, or the key of
the upstream at that address) every job uses it. Without one, and when the
endpoint did not answer without a key, a job uses the key of its user's
latest request: it lives in this process's memory only, and a job whose user
has no known key waits (no attempt spent). A key goes only to the endpoint it
was configured or sent for: the gateway decides which keys may reach the
extraction endpoint (`MemoryEngine.provide_key`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memory.extraction import Extractor
    from memory.handoff import HandoffSender


class ExtractionKeys:
    """The configured key, or each user's latest key (process memory only)."""

    def __init__(
        self,
        configured: str | None,
        extractor: Extractor,
        *,
        handoff: HandoffSender | None,
        wake: Callable[[], None],
    ) -> None:
        # The key configured for the extraction endpoint, if any.
        self.configured = configured
        self._extractor = extractor
        # Set when another process runs the jobs: keys are handed over to it.
        self._handoff = handoff
        # Wakes this process's workers: a user's jobs may be claimable now.
        self._wake = wake
        # BYOK: user_id -> the key of their latest request.
        self._keys: dict[str, str] = {}

    def needs_user_keys(self) -> bool:
        """Whether jobs need their users' own keys: none is configured for the
        endpoint and it did not answer without one."""
        return not self.configured and self._extractor.needs_key

    def provide(self, user_id: str, api_key: str | None, *, hand_over: bool = True) -> None:
        """Remember the key of this user's latest request for their extraction
        jobs. The caller vouches that this key may go to the extraction
        endpoint (it was sent to that same upstream). `hand_over=False`: the
        caller's own wake-up carries the key (one message per exchange)."""
        if not api_key or self.configured:
            return
        known = self._keys.get(user_id)
        self._keys[user_id] = api_key
        if known == api_key or not hand_over:
            return
        if self._handoff is not None:
            self._handoff.send(user_id, api_key)
        elif known is None:
            self._wake()

    def knows(self, user_id: str) -> bool:
        """Whether a key of this user's is known here."""
        return user_id in self._keys

    def users(self) -> list[str]:
        """The users whose key is known here."""
        return list(self._keys)

    def claimable_users(self) -> list[str] | None:
        """The users whose jobs may be claimed now (None: everyone's)."""
        return list(self._keys) if self.needs_user_keys() else None

    def key_for(self, user_id: str) -> str | None:
        """The key a job of this user sends: the configured one, or theirs."""
        return self.configured or self._keys.get(user_id)

    def to_hand_over(self, api_key: str | None) -> str | None:
        """The key a wake-up carries to the extraction process: a user's own
        key when none is configured (that process learns it back after a
        restart from the user's next exchange)."""
        return api_key if api_key and not self.configured else None

    def forget(self, user_id: str) -> None:
        """Drop a user's key (the user is erased)."""
        self._keys.pop(user_id, None)
