"""The chat APIs the gateway gives memory to, one module each.

The pipeline (gateway/proxy.py, gateway/relay.py, gateway/memory_hooks.py) is
the same for every API: identify the user, search their memories, inject
them, forward, relay the answer untouched, record the exchange. What differs
is the wire format, and that is all a `ChatApi` describes: how a request is
checked, where its user's words are, where memories go in, and how a copy of
the answer is read.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.routing import Api
from gateway.sse import Completion, SSEParser


class ChatApi(Protocol):
    # The path it is served at, for messages and logs.
    path: str
    # Which upstreams it may go to (`api:` of an upstream in gateway.yaml).
    upstream_api: Api
    # Body fields naming the user, tried in order after keys and headers.
    user_fields: tuple[str, ...]

    def check(self, body: dict[str, Any]) -> None:
        """Raise a 400 `GatewayError` when the body cannot be this API's request."""
        ...

    def working_copy(self, body: dict[str, Any]) -> dict[str, Any]:
        """A copy `inject` may change without touching the client's body."""
        ...

    def query(self, body: dict[str, Any]) -> str:
        """The user's newest words: what memories are searched with."""
        ...

    def inject(self, body: dict[str, Any], text: str, position: str) -> None:
        """Put the memory block `text` into the working copy `body`."""
        ...

    def new_turns(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The user turns this request adds (as chat messages), to record."""
        ...

    def parser(self) -> SSEParser:
        """A fresh parser for a copy of a streamed answer."""
        ...

    def parse(self, data: bytes) -> Completion | None:
        """A whole (non-streamed) answer, or None when it is not one."""
        ...

    def stream_error(self, message: str, code: str) -> bytes:
        """The event that ends a relayed stream the upstream broke off."""
        ...
