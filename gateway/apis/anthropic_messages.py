"""Anthropic Messages (`/v1/messages`): where memories go in, and how an answer is read.

Memories go into `system`, after everything already there: a prompt cache
breakpoint (`cache_control`) on a system block caches the prefix up to it, so
the block is appended after the last one and the cached prefix survives. A
string `system` stays a string (the block is appended to it); no cache
marker is added, so a request already using all four breakpoints is fine.

What is recorded: the text blocks of the user messages that end the
conversation (never `tool_result` or image blocks: an agent's tool outputs
are not what its user said) and the assistant's text (never `tool_use` or
`thinking`). A stream ends with `message_stop`; `error` ends it as a failure.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import GatewayError
from gateway.routing import Api
from gateway.sse import Completion, SSEParser
from memory.messages import content_text


def _text(content: Any) -> str:
    """The text of a message's content: a string, or its text blocks joined
    (a block names its type: one without is not text)."""
    return content_text(content, untyped=None)


def _bad(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_type", retryable=False)


class MessagesStream(SSEParser):
    """A copy of a streamed message, read event by event (each event's data
    carries its `type`; the `event:` lines say the same)."""

    __slots__ = ()

    def _event(self, data: bytes) -> None:
        event = self._json_event(data)
        if event is None:
            return
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if isinstance(text, str):
                    self._parts.append(text)
        elif kind == "content_block_start":
            block = event.get("content_block")
            if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use"):
                self.tool_calls = True
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self.finish_reason = delta["stop_reason"]
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = True
            self.done = True


class AnthropicMessages:
    path: str = "/v1/messages"
    upstream_api: Api = "anthropic"
    # None: `metadata.user_id` is not read. Claude Code puts its session in it,
    # which would make every session a new user; name users with a key or header.
    user_fields: tuple[str, ...] = ()

    def check(self, body: dict[str, Any]) -> None:
        if not isinstance(body.get("messages"), list):
            raise _bad("messages: Field required (a list of messages)", "messages")
        system = body.get("system")
        if system is not None and not isinstance(system, str | list):
            raise _bad("system: must be a string or a list of text blocks", "system")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise _bad("metadata: must be an object", "metadata")

    def working_copy(self, body: dict[str, Any]) -> dict[str, Any]:
        system = body.get("system")
        return {**body, "system": list(system)} if isinstance(system, list) else dict(body)

    def query(self, body: dict[str, Any]) -> str:
        for message in reversed(body["messages"]):
            if isinstance(message, dict) and message.get("role") == "user":
                text = _text(message.get("content"))
                if text.strip():
                    return text
                # A tool result is the agent talking, not the user: look further back.
        return ""

    def inject(self, body: dict[str, Any], text: str, position: str) -> None:
        system = body.get("system")
        if isinstance(system, list):
            body["system"] = [*system, {"type": "text", "text": text}]
        elif isinstance(system, str) and system:
            body["system"] = f"{system}\n\n{text}"
        else:
            body["system"] = text

    def new_turns(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return []
        trailing: list[str] = []
        for message in reversed(messages):
            if not isinstance(message, dict) or message.get("role") != "user":
                break
            trailing.append(_text(message.get("content")))
        return [{"role": "user", "content": t.strip()} for t in trailing[::-1] if t.strip()]

    def parser(self) -> SSEParser:
        return MessagesStream()

    def parse(self, data: bytes) -> Completion | None:
        try:
            message = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return None
        if not isinstance(message, dict) or message.get("type") != "message":
            return None
        content = message.get("content")
        blocks = content if isinstance(content, list) else []
        calls = any(isinstance(b, dict) and b.get("type") == "tool_use" for b in blocks)
        stop = message.get("stop_reason")
        return Completion(
            text=_text(blocks) or None,
            finish_reason=stop if isinstance(stop, str) else None,
            tool_calls=calls,
        )

    def stream_error(self, message: str, code: str) -> bytes:
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + msgspec.json.encode(payload) + b"\n\n"


ANTHROPIC_MESSAGES = AnthropicMessages()
