"""OpenAI Responses (`/v1/responses`): where memories go in, and how an answer is read.

A stateful call (`previous_response_id` or `conversation`) gets the memory
block appended to `instructions`: instructions are not carried to the next
turn, so memories never pile up in the stored chain, whereas an injected
input item would be stored with the conversation and repeated on every turn.
A stateless call, whose `input` is the whole history, gets one `developer`
item just before its last user item, as chat does, so the prefix stays
byte-identical for prompt caches.

What is recorded: the new user items (a string `input`, or the user messages
that end the input list; never tool or reasoning items) and the assistant's
`output_text`. A stream has named events and no `[DONE]`: it ends with
`response.completed`, `response.incomplete` or `response.failed`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.errors import GatewayError
from gateway.routing import Api
from gateway.sse import Completion, SSEParser
from memory import injection
from memory.messages import content_text

# Content parts that carry text, in input items and in output messages.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
# Output items that are calls the model made (function, tools run by the host).
_CALL_SUFFIX = "_call"


def _text(content: Any) -> str:
    """The text of an item's content: a string, or its text parts joined."""
    return content_text(content, _TEXT_PARTS, untyped="input_text")


def _is_user_message(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("role") == "user"
        and item.get("type", "message") == "message"
    )


def _output(response: Any) -> Completion | None:
    """What the assistant answered in a response object."""
    if not isinstance(response, dict) or not isinstance(response.get("output"), list):
        return None
    parts: list[str] = []
    calls = False
    for item in response["output"]:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message" and item.get("role", "assistant") == "assistant":
            text = _text(item.get("content"))
            if text:
                parts.append(text)
        elif isinstance(kind, str) and kind.endswith(_CALL_SUFFIX):
            calls = True
    status = response.get("status")
    finish = {"completed": "stop", "incomplete": "length"}.get(status)  # type: ignore[arg-type]
    return Completion(text="".join(parts) or None, finish_reason=finish, tool_calls=calls)


class ResponsesStream(SSEParser):
    """A copy of a streamed response, read event by event (the `type` in each
    event's data names it; the `event:` lines say the same)."""

    __slots__ = ("_final",)

    def __init__(self) -> None:
        super().__init__()
        self._final: Completion | None = None

    @property
    def text(self) -> str | None:
        if self._final is not None and self._final.text is not None:
            return self._final.text
        return super().text

    def _event(self, data: bytes) -> None:
        event = self._json_event(data)
        if event is None:
            return
        kind = event.get("type")
        if kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            self._parts.append(event["delta"])
        elif kind in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item")
            if isinstance(item, dict) and str(item.get("type", "")).endswith(_CALL_SUFFIX):
                self.tool_calls = True
        elif kind in ("response.completed", "response.incomplete"):
            self._final = _output(event.get("response"))
            self.finish_reason = "stop" if kind == "response.completed" else "length"
            if self._final is not None and self._final.tool_calls:
                self.tool_calls = True
            self.done = True
        elif kind in ("response.failed", "error"):
            self.error = True
            self.done = True


class Responses:
    path: str = "/v1/responses"
    upstream_api: Api = "openai"
    # The Responses API's own user identifier first; `user` is its deprecated name.
    user_fields: tuple[str, ...] = ("safety_identifier", "user")

    def check(self, body: dict[str, Any]) -> None:
        given = body.get("input")
        if given is not None and not isinstance(given, str | list):
            raise GatewayError(
                400,
                "'input' must be a string or a list of items",
                param="input",
                code="invalid_type",
                retryable=False,
            )
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise GatewayError(
                400,
                "'instructions' must be a string",
                param="instructions",
                code="invalid_type",
                retryable=False,
            )

    def working_copy(self, body: dict[str, Any]) -> dict[str, Any]:
        given = body.get("input")
        return {**body, "input": list(given)} if isinstance(given, list) else dict(body)

    def query(self, body: dict[str, Any]) -> str:
        given = body.get("input")
        if isinstance(given, str):
            return given
        if isinstance(given, list):
            for item in reversed(given):
                if _is_user_message(item):
                    return _text(item.get("content"))
        return ""

    def inject(self, body: dict[str, Any], text: str, position: str) -> None:
        given = body.get("input")
        stateful = body.get("previous_response_id") is not None or body.get("conversation")
        if stateful or not isinstance(given, str | list):
            instructions = body.get("instructions")
            body["instructions"] = f"{instructions}\n\n{text}" if instructions else text
            return
        items = [{"role": "user", "content": given}] if isinstance(given, str) else given
        item = {"role": "developer", "content": text}
        body["input"] = injection.place(items, item, position)  # type: ignore[arg-type]

    def new_turns(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        given = body.get("input")
        if isinstance(given, str):
            texts = [given]
        elif isinstance(given, list):
            trailing: list[str] = []
            for item in reversed(given):
                if not _is_user_message(item):
                    break
                trailing.append(_text(item.get("content")))
            texts = trailing[::-1]
        else:
            texts = []
        return [{"role": "user", "content": t.strip()} for t in texts if t.strip()]

    def parser(self) -> SSEParser:
        return ResponsesStream()

    def parse(self, data: bytes) -> Completion | None:
        try:
            response = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return None
        return _output(response)

    def stream_error(self, message: str, code: str) -> bytes:
        payload = {"type": "error", "code": code, "message": message, "param": None}
        return b"event: error\ndata: " + msgspec.json.encode(payload) + b"\n\n"


RESPONSES = Responses()
