"""Scripted answers for the gateway's own extraction calls.

The scripted upstream serves both the app's chat calls and the extraction LLM;
these helpers tell the two apart, read what the gateway showed the extractor,
and build the model's structured answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tests.upstream import JSONReply, Recorded


def is_extraction(request: Recorded) -> bool:
    if not request.path.endswith("/chat/completions"):
        return False
    fmt = request.json.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object")


def extraction_prompt(request: Recorded) -> str:
    return str(request.json["messages"][-1]["content"])


def latest_exchange(request: Recorded) -> str:
    """The part of the extraction prompt that holds the new exchange."""
    return extraction_prompt(request).split("The latest exchange", 1)[-1]


def stored_facts(request: Recorded) -> list[dict[str, Any]]:
    """The existing memories the gateway showed the extractor, as {"id": alias, "text": ...}."""
    section = extraction_prompt(request).split("Facts already stored", 1)[1]
    facts = []
    for line in section.splitlines()[1:]:
        line = line.strip()
        if line.startswith("{"):
            facts.append(json.loads(line))
        elif facts or (line and not line.startswith("(")):
            break
    return facts


def llm_answer(operations: list[dict[str, Any]]) -> JSONReply:
    """A chat completion whose content is the operations, strict-schema style."""
    content = json.dumps(
        {"operations": [{"id": None, "text": None, **op} for op in operations]},
        ensure_ascii=False,
    )
    return JSONReply(
        {
            "id": "chatcmpl-extract",
            "object": "chat.completion",
            "created": 0,
            "model": "extractor",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
        }
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
