"""An instant OpenAI-compatible upstream on loopback, for benchmarks.

A raw asyncio HTTP/1.1 server (uvloop when present, keep-alive, no framework)
so that the baseline it sets is as cheap as possible: whatever a proxy adds on
top of it is the proxy's cost.

- `POST /v1/chat/completions` answers a fixed completion, or an SSE stream of
  `--chunks` chunks when the body says `"stream": true`.
- A body carrying `response_format` is the gateway's extraction call: it gets
  `{"operations": []}` (or, with `--add`, one ADD of a fact derived from the
  exchange), and is counted with its prompt size.
- `GET /stats` returns the counters as JSON; `POST /stats/reset` zeroes them.

Run: `python bench/fake_upstream.py --port 0` prints `PORT <n>` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

REPLY = "The capital of France is Paris. It has been the capital for a long time."


class Counters(msgspec.Struct):
    chat: int = 0
    stream: int = 0
    extraction: int = 0
    # Characters of every message sent to the extraction call; tokens ~ chars / 4.
    extraction_prompt_chars: int = 0
    extraction_prompt_tokens_est: int = 0
    other: int = 0


def _completion(content: str, model: str) -> bytes:
    return _encoder.encode(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36},
        }
    )


def _stream_body(model: str, chunks: int) -> bytes:
    """The whole SSE body, pre-framed as HTTP chunks (one per event)."""
    words = REPLY.split(" ")
    events = []
    for i in range(chunks):
        delta: dict[str, Any] = {"content": words[i % len(words)] + " "}
        if i == 0:
            delta["role"] = "assistant"
        events.append(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
        )
    events.append(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
    )
    out = bytearray()
    for e in events:
        data = b"data: " + _encoder.encode(e) + b"\n\n"
        out += b"%x\r\n%s\r\n" % (len(data), data)
    done = b"data: [DONE]\n\n"
    out += b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)
    return bytes(out)


def _framed(events: list[bytes]) -> bytes:
    """SSE events pre-framed as HTTP chunks (one per event), terminated."""
    out = bytearray()
    for data in events:
        out += b"%x\r\n%s\r\n" % (len(data), data)
    return bytes(out + b"0\r\n\r\n")


def _named(event: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event["type"].encode(), _encoder.encode(event))


def _response(content: str, model: str) -> dict[str, Any]:
    """A Responses API answer with one assistant message."""
    return {
        "id": "resp_bench",
        "object": "response",
        "created_at": 0,
        "status": "completed",
        "model": model,
        "output": [
            {
                "id": "msg_bench",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": content, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 20, "output_tokens": 16, "total_tokens": 36},
    }


def _responses_stream(model: str, chunks: int) -> bytes:
    words = REPLY.split(" ")
    part: dict[str, Any] = {"item_id": "msg_bench", "output_index": 0, "content_index": 0}
    created = {**_response("", model), "output": []}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": created}]
    events += [
        {"type": "response.output_text.delta", **part, "delta": words[i % len(words)] + " "}
        for i in range(chunks)
    ]
    events.append({"type": "response.completed", "response": _response(REPLY, model)})
    return _framed([_named({**e, "sequence_number": i}) for i, e in enumerate(events)])


def _message(content: str, model: str) -> dict[str, Any]:
    """An Anthropic Messages answer with one text block."""
    return {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": content}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 20, "output_tokens": 16},
    }


def _messages_stream(model: str, chunks: int) -> bytes:
    words = REPLY.split(" ")
    start = {**_message("", model), "content": [], "stop_reason": None}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    events += [
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": words[i % len(words)] + " "},
        }
        for i in range(chunks)
    ]
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {}},
        {"type": "message_stop"},
    ]
    return _framed([_named(e) for e in events])


def _extraction_answer(body: dict[str, Any], add: bool) -> str:
    if not add:
        return '{"operations": []}'
    # One fact per distinct exchange text (not per prompt: the prompt also lists
    # stored facts), so every new exchange really writes a row and a repeated
    # one is de-duplicated, as a real extractor's would be.
    messages = body.get("messages") or [{}]
    prompt = str(messages[-1].get("content", ""))
    exchange = prompt.split("The latest exchange", 1)[-1]
    digest = hashlib.sha1(exchange.encode()).hexdigest()[:12]
    return _encoder.encode(
        {"operations": [{"op": "ADD", "text": f"The user mentioned topic {digest}."}]}
    ).decode()


class Upstream(asyncio.Protocol):
    def __init__(self, app: FakeUpstream) -> None:
        self.app = app
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            start = end + 4
            if headers.get("transfer-encoding", "").lower() == "chunked":
                parsed = _dechunk(self.buf, start)
                if parsed is None:
                    return
                body, consumed = parsed
            else:
                length = int(headers.get("content-length", "0"))
                if len(self.buf) < start + length:
                    return
                body, consumed = bytes(self.buf[start : start + length]), start + length
            del self.buf[:consumed]
            self.app.handle(self.transport, method, target.split("?", 1)[0], body)  # type: ignore[arg-type]


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            if len(buf) < pos + 2:
                return None
            return bytes(out), pos + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


class FakeUpstream:
    def __init__(self, chunks: int, add: bool) -> None:
        self.chunks = chunks
        self.add = add
        self.counters = Counters()
        self._streams: dict[str, bytes] = {}

    def respond(
        self,
        transport: asyncio.Transport,
        status: int,
        body: bytes,
        ctype: str = "application/json",
    ) -> None:
        transport.write(
            b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (status, ctype.encode(), len(body), body)
        )

    def handle(self, transport: asyncio.Transport, method: str, path: str, raw: bytes) -> None:
        c = self.counters
        if path.endswith("/chat/completions") and method == "POST":
            body = _decoder.decode(raw) if raw else {}
            model = str(body.get("model", "bench-model"))
            if "response_format" in body:
                c.extraction += 1
                chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
                c.extraction_prompt_chars += chars
                c.extraction_prompt_tokens_est += chars // 4
                self.respond(transport, 200, _completion(_extraction_answer(body, self.add), model))
                return
            if body.get("stream"):
                c.stream += 1
                payload = self._streams.get(model)
                if payload is None:
                    payload = self._streams[model] = _stream_body(model, self.chunks)
                transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n" + payload
                )
                return
            c.chat += 1
            self.respond(transport, 200, _completion(REPLY, model))
            return
        for suffix, answer, stream in (
            ("/responses", _response, _responses_stream),
            ("/messages", _message, _messages_stream),
        ):
            if path.endswith(suffix) and method == "POST":
                body = _decoder.decode(raw) if raw else {}
                model = str(body.get("model", "bench-model"))
                if body.get("stream"):
                    c.stream += 1
                    key = suffix + model
                    payload = self._streams.get(key)
                    if payload is None:
                        payload = self._streams[key] = stream(model, self.chunks)
                    transport.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n" + payload
                    )
                else:
                    c.chat += 1
                    self.respond(transport, 200, _encoder.encode(answer(REPLY, model)))
                return
        if path == "/stats" and method == "GET":
            self.respond(transport, 200, _encoder.encode(c))
            return
        if path == "/stats/reset" and method == "POST":
            self.counters = Counters()
            self.respond(transport, 200, b"{}")
            return
        if path.endswith("/models"):
            self.respond(
                transport, 200, b'{"object":"list","data":[{"id":"bench-model","object":"model"}]}'
            )
            return
        c.other += 1
        self.respond(transport, 404, b'{"error":{"message":"not found","type":"invalid_request"}}')


async def serve(port: int, chunks: int, add: bool) -> None:
    app = FakeUpstream(chunks, add)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(app), "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=16, help="SSE chunks per streamed reply")
    parser.add_argument("--add", action="store_true", help="extraction answers one ADD")
    args = parser.parse_args()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(args.port, args.chunks, args.add))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
