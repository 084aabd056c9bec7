"""A ChatHooks implementation that records what the gateway hands to each seam."""

from __future__ import annotations

import threading
import time
from typing import Any

from gateway.hooks import ChatContext, CompletedExchange


class RecordingHooks:
    def __init__(
        self, *, rewrite: Any = None, response_headers: dict[str, str] | None = None
    ) -> None:
        # `rewrite(messages) -> messages` replaces the messages before forwarding.
        self.rewrite = rewrite
        self.response_headers = response_headers or {}
        self.is_ready = True
        self.fail_after = False
        self.contexts: list[ChatContext] = []
        self.forwarded: list[dict[str, Any]] = []
        self.completions: list[tuple[ChatContext, CompletedExchange]] = []
        self.completed = threading.Event()
        self.started = False
        self.stopped = False

    async def startup(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True

    async def ready(self) -> bool:
        return self.is_ready

    async def notes(self) -> dict[str, str]:
        return {}

    async def before_forward(self, ctx: ChatContext, body: dict[str, Any]) -> bool:
        self.contexts.append(ctx)
        ctx.response_headers.update(self.response_headers)
        if self.rewrite is None:
            return False
        body["messages"] = self.rewrite(body["messages"])
        self.forwarded.append(body)
        return True

    async def after_completion(self, ctx: ChatContext, exchange: CompletedExchange) -> None:
        self.completions.append((ctx, exchange))
        self.completed.set()
        if self.fail_after:
            raise RuntimeError("hook failure must not reach the client")

    def wait_completed(self, count: int = 1, timeout: float = 30.0) -> list[CompletedExchange]:
        deadline = time.monotonic() + timeout
        while len(self.completions) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.completions) >= count, f"after_completion ran {len(self.completions)} times"
        return [exchange for _, exchange in self.completions]
