"""A scripted extraction model behind an `httpx.MockTransport`.

It speaks just enough of `/v1/chat/completions` for the `openai` SDK: each call
is answered by the next scripted reply (or by a `responder` function), and every
request is recorded so tests can read the prompt, the response_format and the key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx


class Call:
    """One request the model received."""

    def __init__(self, request: httpx.Request) -> None:
        self.body: dict[str, Any] = json.loads(request.content)
        self.authorization = request.headers.get("authorization", "")
        self.url = str(request.url)

    @property
    def response_format(self) -> str | None:
        fmt = self.body.get("response_format")
        return fmt.get("type") if isinstance(fmt, dict) else None

    @property
    def system(self) -> str:
        return self.body["messages"][0]["content"]

    @property
    def prompt(self) -> str:
        return self.body["messages"][-1]["content"]

    def _json_lines(self, section: str) -> list[dict[str, Any]]:
        marker = {"memories": "Facts already stored", "conversation": "The latest exchange"}[
            section
        ]
        text = self.prompt.split(marker, 1)[1]
        lines = []
        for line in text.splitlines()[1:]:
            line = line.strip()
            if line.startswith("{"):
                lines.append(json.loads(line))
            elif lines or (line and not line.startswith("(")):
                break
        return lines

    @property
    def memories(self) -> list[dict[str, Any]]:
        """The stored facts shown to the model, as {"id": alias, "text": ...}."""
        return self._json_lines("memories")

    @property
    def conversation(self) -> list[dict[str, Any]]:
        return self._json_lines("conversation")

    def user_text(self) -> str:
        return "\n".join(m["content"] for m in self.conversation if m["role"] == "user")


Reply = Any  # dict (encoded as the answer), str (raw content) or httpx.Response


def ops(*operations: dict[str, Any]) -> dict[str, Any]:
    """`{"operations": [...]}`, filling the nullable fields strict mode requires."""
    return {"operations": [{"id": None, "text": None, **o} for o in operations]}


def completion(content: str, *, finish_reason: str = "stop") -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-scripted",
            "object": "chat.completion",
            "created": 0,
            "model": "scripted",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
    )


def rejection(kind: str) -> httpx.Response:
    return httpx.Response(
        400,
        json={
            "error": {
                "message": f"response_format type {kind!r} is not supported",
                "type": "invalid_request_error",
                "param": "response_format",
                "code": None,
            }
        },
    )


class ScriptedLLM:
    """Canned decisions; counts calls, records prompts, can refuse response formats."""

    def __init__(
        self,
        replies: list[Reply] | None = None,
        *,
        responder: Callable[[Call], Reply] | None = None,
        reject: tuple[str, ...] = (),
        keyless: bool = False,
    ) -> None:
        self.replies = list(replies or [])
        # A local server that needs no key; otherwise, like OpenAI, a request
        # without one is a 401 (and `GET /models` lists models only with one).
        self.keyless = keyless
        self.unauthorized: list[httpx.Request] = []
        self.responder = responder
        # response_format types this "server" answers with 400 (like llama.cpp for json_schema).
        self.reject = reject
        self.calls: list[Call] = []
        self.rejected: list[Call] = []
        # While set, requests wait here (a model that is slow, or a worker about to die).
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.transport = httpx.MockTransport(self._handle)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport)

    @property
    def answered(self) -> list[Call]:
        """Calls that got an answer (not refused for their response_format)."""
        return self.calls

    def hold(self) -> None:
        """Make the next requests wait until `release()`."""
        self.gate = asyncio.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if not self.keyless and "authorization" not in request.headers:
            self.unauthorized.append(request)
            return httpx.Response(
                401,
                json={
                    "error": {
                        "message": "You didn't provide an API key.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
            )
        if request.method == "GET" and request.url.path.endswith("/models"):
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": "gpt-4o-mini"}, {"id": "scripted"}]}
            )
        call = Call(request)
        if call.response_format in self.reject:
            self.rejected.append(call)
            return rejection(call.response_format or "")
        self.calls.append(call)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.replies:
            reply = self.replies.pop(0)
        elif self.responder is not None:
            reply = self.responder(call)
        else:
            reply = ops()
        if callable(reply):
            reply = reply(call)
        if isinstance(reply, httpx.Response):
            return reply
        if isinstance(reply, str):
            return completion(reply)
        return completion(json.dumps(reply, ensure_ascii=False))
