"""The SSE copy parser sees the same answer however the bytes are split."""

from __future__ import annotations

import pytest

from gateway.sse import SSEParser, parse_completion, sse_error_event
from tests.upstream import DONE, chunk, sse

EVENTS = [
    sse(chunk("", role="assistant")),
    sse(chunk("Bon")),
    sse(chunk("jour", index=0)),
    sse(chunk("ignored", index=1)),
    b": keep-alive comment\n\n",
    sse(chunk(" à vous")),
    sse(chunk(finish_reason="stop")),
    sse({"id": "x", "choices": [], "usage": {"total_tokens": 3}}),
    DONE,
]
STREAM = b"".join(EVENTS)


def _parse(pieces: list[bytes]) -> SSEParser:
    parser = SSEParser()
    for piece in pieces:
        parser.feed(piece)
    parser.close()
    return parser


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_any_split_gives_the_same_answer(size):
    parser = _parse([STREAM[i : i + size] for i in range(0, len(STREAM), size)])
    assert parser.text == "Bonjour à vous"
    assert parser.finish_reason == "stop"
    assert parser.done and not parser.error and not parser.invalid and not parser.tool_calls


def test_crlf_line_endings():
    parser = _parse([STREAM.replace(b"\n", b"\r\n")])
    assert parser.text == "Bonjour à vous" and parser.done


def test_a_stream_without_done_is_not_done():
    parser = _parse([b"".join(EVENTS[:-1])])
    assert parser.finish_reason == "stop" and not parser.done


def test_error_events_and_tool_calls_are_noticed():
    call = [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]
    parser = _parse([sse(chunk(tool_calls=call)), sse({"error": {"message": "boom"}})])
    assert parser.tool_calls and parser.error


def test_non_stream_completion():
    body = (
        b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},'
        b' "finish_reason": "stop"}]}'
    )
    completion = parse_completion(body)
    assert (completion.text, completion.finish_reason, completion.tool_calls) == (
        "hi",
        "stop",
        False,
    )
    assert parse_completion(b"not json") is None
    assert parse_completion(b'{"choices": []}') is None


def test_error_event_shape():
    event = sse_error_event("broke", code="upstream_error")
    assert event == (
        b'data: {"error":{"message":"broke","type":"api_error","param":null,'
        b'"code":"upstream_error"}}\n\n'
    )
