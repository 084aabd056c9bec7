"""OpenAI Chat Completions (`/v1/chat/completions`): memories go in as one
system message before the last user message, so every earlier message stays
byte-identical and prompt caches keep hitting."""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError
from gateway.routing import Api
from gateway.sse import Completion, SSEParser, parse_completion, sse_error_event
from memory import injection
from memory import messages as chat_messages


class ChatCompletions:
    path: str = "/v1/chat/completions"
    upstream_api: Api = "openai"
    user_fields: tuple[str, ...] = ("user",)

    def check(self, body: dict[str, Any]) -> None:
        if not isinstance(body.get("messages"), list):
            raise GatewayError(
                400,
                "'messages' must be a list",
                param="messages",
                code="invalid_type",
                retryable=False,
            )

    def working_copy(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "messages": list(body["messages"])}

    def query(self, body: dict[str, Any]) -> str:
        return chat_messages.last_user_text(body["messages"])

    def inject(self, body: dict[str, Any], text: str, position: str) -> None:
        message = {"role": "system", "content": text}
        body["messages"] = injection.place(body["messages"], message, position)  # type: ignore[arg-type]

    def new_turns(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = body.get("messages")
        return chat_messages.new_turns(messages if isinstance(messages, list) else [])

    def parser(self) -> SSEParser:
        return SSEParser()

    def parse(self, data: bytes) -> Completion | None:
        return parse_completion(data)

    def stream_error(self, message: str, code: str) -> bytes:
        # Never a fake [DONE]: the SDK raises on an `error` event.
        return sse_error_event(message, code=code)


CHAT_COMPLETIONS = ChatCompletions()
