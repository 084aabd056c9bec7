"""Read a copy of a chat completion while the original bytes go to the client.

The parser never produces bytes for the client: it only watches. It assembles
choice 0's assistant text, its finish_reason, whether tool calls appeared and
whether `data: [DONE]` arrived - what the after-completion seam needs.
"""

from __future__ import annotations

from typing import Any

import msgspec


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: msgspec.Raw = msgspec.Raw()


class _ChunkChoice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_ChunkChoice] | None = None
    error: msgspec.Raw = msgspec.Raw()


_chunk_decoder = msgspec.json.Decoder(_Chunk)


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: msgspec.Raw = msgspec.Raw()


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message | None = None
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] | None = None


_completion_decoder = msgspec.json.Decoder(_Completion)


class Completion(msgspec.Struct):
    """What the assistant answered in choice 0."""

    text: str | None = None
    finish_reason: str | None = None
    tool_calls: bool = False


def _present(raw: msgspec.Raw) -> bool:
    # An absent field decodes to the empty Raw; `null` and `[]` say "none" too.
    return len(raw) > 0 and bytes(raw) not in (b"null", b"[]")


def parse_completion(body: bytes) -> Completion | None:
    """Choice 0 of a non-streamed chat completion; None when the body is not one."""
    try:
        parsed = _completion_decoder.decode(body)
    except msgspec.DecodeError:
        return None
    for choice in parsed.choices or ():
        if choice.index == 0 and choice.message is not None:
            return Completion(
                text=choice.message.content,
                finish_reason=choice.finish_reason,
                tool_calls=_present(choice.message.tool_calls),
            )
    return None


class SSEParser:
    """Incremental: feed it chunks exactly as they arrive, in any split."""

    __slots__ = (
        "_buffer",
        "_data",
        "_parts",
        "done",
        "error",
        "finish_reason",
        "invalid",
        "tool_calls",
    )

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._parts: list[str] = []
        self.finish_reason: str | None = None
        self.tool_calls = False
        self.done = False
        self.error = False
        # Set when an event's data could not be read as a chat chunk.
        self.invalid = False

    @property
    def text(self) -> str | None:
        return "".join(self._parts) if self._parts else None

    def feed(self, chunk: bytes) -> None:
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line)
        self._buffer = buffer[start:]

    def close(self) -> None:
        """The stream ended: a pending event without its blank line still counts."""
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"))
            self._buffer = b""
        self._line(b"")

    def _line(self, line: bytes) -> None:
        if not line:
            if self._data:
                self._event(b"\n".join(self._data))
                self._data = []
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # Comments (": keep-alive") and event/id/retry fields carry no text.

    def _json_event(self, data: bytes) -> dict[str, Any] | None:
        """An event's data as a JSON object, for APIs whose events say their
        `type` in it; None (and `invalid` set) when it is not one."""
        try:
            event = msgspec.json.decode(data)
        except msgspec.DecodeError:
            event = None
        if not isinstance(event, dict):
            self.invalid = True
            return None
        return event

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = _chunk_decoder.decode(data)
        except msgspec.DecodeError:
            self.invalid = True
            return
        if _present(chunk.error):
            self.error = True
        for choice in chunk.choices or ():
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta is not None:
                if delta.content:
                    self._parts.append(delta.content)
                if _present(delta.tool_calls):
                    self.tool_calls = True
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason


def sse_error_event(message: str, *, code: str, type: str = "api_error") -> bytes:
    payload: dict[str, Any] = {
        "error": {"message": message, "type": type, "param": None, "code": code}
    }
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
