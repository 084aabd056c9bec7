"""Reading OpenAI chat messages: their text, and which turns are new.

Message contents are a string or a list of parts; only text parts carry
anything to remember or search for (images, audio and files are ignored).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any


def content_text(
    content: Any, kinds: Collection[str] = ("text",), untyped: str | None = "text"
) -> str:
    """The text of a message content: a string, or its text parts joined.
    `kinds`: the part types that carry text (the Responses API has several);
    `untyped`: the type a part without one counts as (None: none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type", untyped) in kinds
            and isinstance(part.get("text"), str)
        )
    return ""


def role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def text_of(message: Any) -> str:
    return content_text(message.get("content")) if isinstance(message, dict) else ""


def user_texts(messages: Iterable[Any]) -> list[str]:
    """The non-empty texts of the user messages, stripped."""
    texts = (text_of(m).strip() for m in messages if role(m) == "user")
    return [t for t in texts if t]


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if role(message) == "user":
            return text_of(message)
    return ""


def new_turns(messages: list[Any]) -> list[dict[str, Any]]:
    """The user turns the client added since the last assistant message.

    Clients resend the whole history every turn; only what follows the last
    assistant message is new, so old turns are never extracted twice.
    """
    start = 0
    for i in range(len(messages) - 1, -1, -1):
        if role(messages[i]) == "assistant":
            start = i + 1
            break
    return [{"role": "user", "content": text} for text in user_texts(messages[start:])]
