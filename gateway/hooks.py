"""The two seams of the chat pipeline, filled by the memory engine.

`before_forward` may rewrite the messages before they go upstream;
`after_completion` receives the finished exchange, only when the upstream
answered successfully and completely. It is awaited just before the last bytes
of the answer go to the client (so a crash cannot lose an exchange the client
saw complete): it must only make the exchange durable, and leave slow work to
run later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from litestar.datastructures import Headers

from gateway.apis import ChatApi
from gateway.apis.chat_completions import CHAT_COMPLETIONS
from gateway.identity import Identity
from memory.models import Scope


@dataclass(slots=True)
class ChatContext:
    """One chat request, as the hooks see it."""

    identity: Identity
    request_headers: Headers
    stream: bool
    # Which chat API the request speaks: where its user's words are and
    # where memories go in.
    api: ChatApi = CHAT_COMPLETIONS
    # The name of the upstream the request goes to, and the model asked for.
    upstream: str | None = None
    model: str | None = None
    # Hooks may add headers (e.g. X-Memory-Status); they are sent on streams too.
    response_headers: dict[str, str] = field(default_factory=dict)
    # The key sent upstream (set by the proxy once headers are built), for
    # the extraction call made on the user's behalf; never logged.
    upstream_api_key: str | None = field(default=None, repr=False)
    # Set by the memory hooks in before_forward for after_completion: the
    # request's memory mode and, when memory applies to it, its scope.
    memory_mode: str | None = None
    memory_scope: Scope | None = None
    # Whether the reply goes to extraction with the user's turns (X-Memory-Record).
    record_reply: bool = True
    # What became of the exchange, for the request's debug log line: the
    # spool job it became, or why there is none.
    recorded: str | None = None


@dataclass(slots=True)
class CompletedExchange:
    # The body as the client sent it, before any rewrite by before_forward.
    request_body: dict[str, Any]
    # Choice 0's assistant content, assembled from the parsed copy.
    reply_text: str | None
    finish_reason: str | None
    tool_calls: bool


@runtime_checkable
class ChatHooks(Protocol):
    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def ready(self) -> bool: ...

    async def notes(self) -> dict[str, str]:
        """What `/ready` adds to a ready answer: problems that do not make the
        gateway unready (chat still works) but that an operator must see."""
        ...

    async def before_forward(self, ctx: ChatContext, body: dict[str, Any]) -> bool:
        """Rewrite the working copy `body` (through `ctx.api`) and return True,
        or return False to forward the client's original bytes."""
        ...

    async def after_completion(self, ctx: ChatContext, exchange: CompletedExchange) -> None:
        """Quick (a durable enqueue); errors are logged, never shown to the client."""
        ...


class NoHooks:
    """A plain proxy: nothing is rewritten, nothing is remembered."""

    async def startup(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def ready(self) -> bool:
        return True

    async def notes(self) -> dict[str, str]:
        return {}

    async def before_forward(self, ctx: ChatContext, body: dict[str, Any]) -> bool:
        return False

    async def after_completion(self, ctx: ChatContext, exchange: CompletedExchange) -> None:
        return None
