"""A scripted OpenAI-compatible upstream, served on loopback for the test session.

By default it answers like a tiny deterministic model: chat completions echo
the last user message (streamed word by word when asked), honour `n`, `tools`
and `stream_options.include_usage`; `/v1/models` and `/v1/embeddings` answer
too. A test scripts anything else: queue a reply for the next request to a
path (`push`), or install a function that answers by request (`script`) - the
memory tests use that to play the extraction model.

Every request is recorded (method, path, headers, body), and a streamed reply
records whether the client hung up before the reply was complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import uvicorn

CREATED = 1_700_000_000


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes
    # Set when the client closed the connection before the reply was complete.
    disconnected: threading.Event = field(default_factory=threading.Event)
    # Set once the whole reply has been written.
    finished: threading.Event = field(default_factory=threading.Event)
    # Indices of the chunks released to the connection so far (streamed replies).
    sent: list[int] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class Reply:
    status: int = 200
    headers: dict[str, str]


@dataclass
class JSONReply(Reply):
    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    # Answer only once this is set (waiting up to `gate_timeout`).
    gate: threading.Event | None = None
    gate_timeout: float = 30.0


@dataclass
class SSEReply(Reply):
    """Writes `chunks` one by one, exactly as given (bytes, or dicts sent as `data:` events)."""

    chunks: list[bytes | dict[str, Any]]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # Before writing chunk i, wait (up to `gate_timeout`) for gates[i] to be set.
    gates: dict[int, threading.Event] = field(default_factory=dict)
    gate_timeout: float = 30.0
    # Drop the connection (no terminating chunk) after writing this many chunks.
    cut_after: int | None = None


@dataclass
class HangReply(Reply):
    """Never answers: headers do not come until the client gives up."""

    seconds: float = 60.0
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class CutStream(Exception):
    """Raised inside the upstream app to drop a connection mid-body."""


def sse(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else msgspec.json.encode(event).decode()
    return f"data: {data}\n\n".encode()


DONE = b"data: [DONE]\n\n"

STANDARD_HEADERS = {
    "x-request-id": "req_scripted",
    "openai-processing-ms": "7",
    "openai-version": "2020-10-01",
    "x-ratelimit-limit-requests": "100",
    "x-ratelimit-remaining-requests": "99",
}


def chunk(
    content: str | None = None,
    *,
    index: int = 0,
    role: str | None = None,
    finish_reason: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    model: str = "test-model",
    id: str = "chatcmpl-scripted",
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ],
    }


def text_stream(words: list[str], *, model: str = "test-model") -> list[bytes | dict[str, Any]]:
    """A complete streamed answer: role, one chunk per word, finish, [DONE]."""
    events: list[bytes | dict[str, Any]] = [chunk("", role="assistant", model=model)]
    events += [chunk(w, model=model) for w in words]
    events += [chunk(finish_reason="stop", model=model), DONE]
    return events


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def default_chat(request: Recorded) -> Reply:
    body = request.json
    model = body.get("model", "test-model")
    text = "echo: " + _last_user_text(body.get("messages", []))
    n = body.get("n") or 1
    tools = body.get("tools")
    use_tool = bool(tools) and body.get("tool_choice") != "none"
    usage = {
        "prompt_tokens": 11,
        "completion_tokens": len(text.split()),
        "total_tokens": 11 + len(text.split()),
    }

    def tool_call(i: int) -> dict[str, Any]:
        name = tools[0]["function"]["name"]
        return {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": '{"q": "x"}'},
        }

    if not body.get("stream"):
        choices = []
        for i in range(n):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if use_tool else f"{text} #{i}" if i else text,
            }
            if use_tool:
                message["tool_calls"] = [tool_call(i)]
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if use_tool else "stop",
                }
            )
        return JSONReply(
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "choices": choices,
                "usage": usage,
                "system_fingerprint": "fp_scripted",
            },
            headers=dict(STANDARD_HEADERS),
        )

    events: list[bytes | dict[str, Any]] = []
    for i in range(n):
        events.append(chunk("", index=i, role="assistant", model=model))
    if use_tool:
        for i in range(n):
            call = tool_call(i)
            events.append(chunk(index=i, model=model, tool_calls=[{"index": 0, **call}]))
    else:
        for word_no, word in enumerate(text.split(" ")):
            for i in range(n):
                piece = word if word_no == 0 else " " + word
                events.append(chunk(piece, index=i, model=model))
        for i in range(1, n):
            events.append(chunk(f" #{i}", index=i, model=model))
    for i in range(n):
        events.append(
            chunk(index=i, model=model, finish_reason="tool_calls" if use_tool else "stop")
        )
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    events.append(DONE)
    return SSEReply(events, headers=dict(STANDARD_HEADERS))


def default_embeddings(request: Recorded) -> Reply:
    body = request.json
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
    dims = body.get("dimensions") or 8
    data = []
    for i, text in enumerate(inputs):
        digest = hashlib.sha256(str(text).encode()).digest()
        vector = [(digest[j % len(digest)] - 128) / 128 for j in range(dims)]
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return JSONReply(
        {
            "object": "list",
            "data": data,
            "model": body.get("model", "test-embed"),
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        },
        headers=dict(STANDARD_HEADERS),
    )


def default_models(request: Recorded) -> Reply:
    """Like OpenAI's: a key is needed (any key; local servers, which answer
    without one, are scripted by the tests about them)."""
    if "authorization" not in request.headers:
        return JSONReply(
            {
                "error": {
                    "message": "You didn't provide an API key.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status=401,
        )
    models = [
        {"id": m, "object": "model", "created": CREATED, "owned_by": "scripted"}
        for m in ("test-model", "gpt-4o-mini", "llama3")
    ]
    return JSONReply({"object": "list", "data": models}, headers=dict(STANDARD_HEADERS))


def response_object(text: str, *, model: str, status: str = "completed") -> dict[str, Any]:
    """A Responses API response whose output is one assistant message."""
    return {
        "id": "resp_scripted",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "model": model,
        "output": [
            {
                "id": "msg_scripted",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 5,
            "output_tokens": 2,
            "total_tokens": 7,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def response_event(event: dict[str, Any]) -> bytes:
    """One Responses stream event: named, as OpenAI sends them."""
    data = msgspec.json.encode(event).decode()
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def responses_stream(words: list[str], *, model: str) -> list[bytes | dict[str, Any]]:
    """A complete streamed response, event by event as OpenAI sends one: the
    message item and its text part opened, one text delta per word, both
    closed, then `response.completed` with the whole response."""
    text = "".join(words)
    final = response_object(text, model=model)
    started = {**final, "status": "in_progress", "output": []}
    item = {**final["output"][0], "status": "in_progress", "content": []}
    empty = {"type": "output_text", "text": "", "annotations": []}
    part = {"item_id": "msg_scripted", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **part, "part": empty},
    ]
    events += [{"type": "response.output_text.delta", **part, "delta": w} for w in words]
    events += [
        {"type": "response.output_text.done", **part, "text": text},
        {"type": "response.content_part.done", **part, "part": {**empty, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": final["output"][0]},
        {"type": "response.completed", "response": final},
    ]
    return [response_event({**e, "sequence_number": i}) for i, e in enumerate(events)]


def _input_text(given: Any) -> str:
    if isinstance(given, str):
        return given
    if isinstance(given, list):
        return _last_user_text([i for i in given if isinstance(i, dict)])
    return ""


def default_responses(request: Recorded) -> Reply:
    """Echoes the last user input, like `default_chat`, as the Responses API answers."""
    body = request.json
    model = body.get("model", "test-model")
    text = "echo: " + _input_text(body.get("input"))
    if body.get("stream"):
        return SSEReply(responses_stream([text[:6], text[6:]], model=model))
    return JSONReply(response_object(text, model=model), headers=dict(STANDARD_HEADERS))


def anthropic_message(text: str, *, model: str, stop_reason: str = "end_turn") -> dict[str, Any]:
    """An Anthropic Messages answer with one text block."""
    return {
        "id": "msg_scripted",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 2},
    }


def anthropic_event(event: dict[str, Any]) -> bytes:
    data = msgspec.json.encode(event).decode()
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def anthropic_stream(words: list[str], *, model: str) -> list[bytes | dict[str, Any]]:
    """A complete streamed message as Anthropic sends one, a ping included."""
    start = {**anthropic_message("", model=model), "content": [], "stop_reason": None}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}
        for w in words
    ]
    events += [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": len(words)},
        },
        {"type": "message_stop"},
    ]
    return [anthropic_event(e) for e in events]


def _anthropic_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


def default_messages(request: Recorded) -> Reply:
    """Echoes the last user message, as Anthropic's Messages API answers."""
    body = request.json
    model = body.get("model", "claude-test")
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    text = "echo: " + (_anthropic_text(users[-1].get("content")) if users else "")
    if body.get("stream"):
        return SSEReply(anthropic_stream([text[:6], text[6:]], model=model))
    return JSONReply(anthropic_message(text, model=model), headers={"request-id": "req_scripted"})


def default_count_tokens(request: Recorded) -> Reply:
    return JSONReply({"input_tokens": len(request.body) // 4})


DEFAULTS: dict[tuple[str, str], Callable[[Recorded], Reply]] = {
    ("POST", "/v1/messages"): default_messages,
    ("POST", "/v1/messages/count_tokens"): default_count_tokens,
    ("POST", "/v1/responses"): default_responses,
    ("POST", "/v1/chat/completions"): default_chat,
    ("POST", "/v1/embeddings"): default_embeddings,
    ("GET", "/v1/models"): default_models,
}


class ScriptedUpstream:
    """The ASGI app. Thread-safe to script and inspect from the test thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[Recorded] = []
        self._queues: dict[str, deque[Reply]] = defaultdict(deque)
        self._scripts: list[Callable[[Recorded], Reply | None]] = []
        self.url = ""  # set once served: "http://127.0.0.1:PORT/v1"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._queues.clear()
            self._scripts.clear()

    def push(self, reply: Reply, path: str = "/v1/chat/completions") -> None:
        """Answer the next request to `path` that no script claims with `reply` (FIFO)."""
        with self._lock:
            self._queues[path].append(reply)

    def script(self, responder: Callable[[Recorded], Reply | None]) -> None:
        """Answer requests by function; None falls through to the defaults."""
        with self._lock:
            self._scripts.append(responder)

    def last(self, path: str | None = None) -> Recorded:
        with self._lock:
            matching = [r for r in self.requests if path is None or r.path == path]
        assert matching, f"the upstream received no request{' to ' + path if path else ''}"
        return matching[-1]

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"expected {count} upstream requests, got {len(self.requests)}")

    def _choose(self, request: Recorded) -> Reply:
        # Scripts first: they claim the requests they recognise (the gateway's own
        # extraction calls), so a reply queued for the app's next chat call is
        # never taken by a background extraction that happens to arrive first.
        with self._lock:
            scripts = list(self._scripts)
        for responder in scripts:
            reply = responder(request)
            if reply is not None:
                return reply
        with self._lock:
            queue = self._queues.get(request.path)
            if queue:
                return queue.popleft()
        handler = DEFAULTS.get((request.method, request.path))
        if handler is None:
            return JSONReply(
                {
                    "error": {
                        "message": f"no route {request.path}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "not_found",
                    }
                },
                status=404,
            )
        return handler(request)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        header_list = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        recorded = Recorded(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            headers=dict(header_list),
            header_list=header_list,
            body=body,
        )
        with self._lock:
            self.requests.append(recorded)
        reply = self._choose(recorded)

        async def watch() -> None:
            message = await receive()
            if message["type"] == "http.disconnect" and not recorded.finished.is_set():
                recorded.disconnected.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._respond(reply, recorded, send)
            recorded.finished.set()
        finally:
            watcher.cancel()

    async def _respond(self, reply: Reply, recorded: Recorded, send: Any) -> None:
        if isinstance(reply, HangReply):
            deadline = time.monotonic() + reply.seconds
            while time.monotonic() < deadline and not recorded.disconnected.is_set():
                await asyncio.sleep(0.02)
            return
        if isinstance(reply, JSONReply):
            if reply.gate is not None:
                await asyncio.to_thread(reply.gate.wait, reply.gate_timeout)
            data = reply.body if isinstance(reply.body, bytes) else msgspec.json.encode(reply.body)
            headers = {"content-type": reply.content_type, **reply.headers}
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
                }
            )
            await send({"type": "http.response.body", "body": data})
            return
        assert isinstance(reply, SSEReply)
        headers = {"content-type": "text/event-stream; charset=utf-8", **reply.headers}
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        for i, item in enumerate(reply.chunks):
            if reply.cut_after is not None and i >= reply.cut_after:
                raise CutStream("scripted cut")
            gate = reply.gates.get(i)
            if gate is not None:
                await _wait(gate, reply.gate_timeout, recorded)
            elif reply.delay and i:
                await asyncio.sleep(reply.delay)
            if recorded.disconnected.is_set():
                return
            data = item if isinstance(item, bytes) else sse(item)
            recorded.sent.append(i)
            await send({"type": "http.response.body", "body": data, "more_body": True})
        if reply.cut_after is not None:
            raise CutStream("scripted cut")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait(gate: threading.Event, timeout: float, recorded: Recorded) -> None:
    deadline = time.monotonic() + timeout
    while not gate.is_set() and time.monotonic() < deadline and not recorded.disconnected.is_set():
        await asyncio.sleep(0.005)


class ServerThread:
    """Serves an ASGI app with uvicorn on 127.0.0.1:0 in a thread with its own event loop."""

    def __init__(self, app: Any, *, uvloop: bool = False) -> None:
        self._uvloop = uvloop
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            loop="none",
            http="httptools",
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-server")
        self.port = 0

    def _run(self) -> None:
        if self._uvloop:
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.server.serve())
        finally:
            loop.close()

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
