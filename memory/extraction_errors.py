"""How an extraction call fails, and whether retrying can help.

    ExtractionError                 the call failed or its answer cannot be
    |                               trusted; `category` says why:
    |   invalid_answer, format_rejected, no_key, error       (retried)
    |   context_length, model_not_found, endpoint_not_found, auth
    |                                   (FOR_GOOD_CATEGORIES: fail at once)
    +-- ExtractionUnavailable       the model could not be reached or was
                                    overloaded: waits without spending attempts
                                    (also a memory.errors.TransientError)

ExtractionError is a memory.errors.MemoryLibraryError (memory/errors.py draws
the whole hierarchy).

`classify` reads an upstream's refusal the same way whatever server sent it:
servers word and number their errors differently (llama-cpp-python refuses a
`response_format` with a 500, OpenAI a missing model with a 404, LiteLLM
with a 400).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from memory.errors import MemoryLibraryError, TransientError
from memory.redaction import public_url

if TYPE_CHECKING:
    import openai

# Where the model is set, for messages that ask the operator to set it.
MODEL_SETTINGS = "memory.llm.model in gateway.yaml, --extraction-model or env MEMORY_LLM_MODEL"
# An error naming any of these is about our `response_format`, whatever its status.
_FORMAT_WORDS = (
    "response_format",
    "json_schema",
    "json_object",
    "schema",
    "structured",
    "grammar",
)
# How servers say the prompt is too long (OpenAI, vLLM, llama.cpp, Ollama, Anthropic...).
_CONTEXT_WORDS = (
    "context_length",
    "context length",
    "maximum context",
    "context window",
    "n_ctx",
    "too many tokens",
    "prompt is too long",
)
# A 400 that says the model does not exist (LiteLLM, some proxies).
_NO_SUCH_MODEL = re.compile(
    r"\bmodel\b.{0,120}\b(not found|does not exist|unknown)|\b(invalid|unknown) model\b"
)

# Failures that no retry can fix: the job can fail at once, its category
# telling the operator what to change.
FOR_GOOD_CATEGORIES: tuple[str, ...] = (
    "context_length",
    "model_not_found",
    "endpoint_not_found",
    "auth",
)


class ExtractionError(MemoryLibraryError):
    """The extraction call failed or its answer cannot be trusted; retry later.

    `category` says why, so the spool can tell what a retry can fix:
    `unavailable` (outage: wait it out), `context_length`, `model_not_found`,
    `endpoint_not_found`, `auth` (see FOR_GOOD_CATEGORIES: retrying cannot
    help), `format_rejected` (every structured-output mode refused),
    `invalid_answer` (not JSON, invalid operations, empty, cut off),
    `no_key` (no key may go to the endpoint yet), `error` (anything else).
    """

    def __init__(self, reason: str, *, category: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category


class ExtractionUnavailable(ExtractionError, TransientError):
    """The extraction model could not be reached or was overloaded (connection
    error, timeout, 429, 5xx): the job waits and retries without using up its
    attempts, so an outage never parks work as failed."""

    def __init__(self, reason: str, *, category: str = "unavailable") -> None:
        super().__init__(reason, category=category)


def _error_text(exc: openai.APIStatusError) -> str:
    """The message and the body, for matching words whatever the server's shape."""
    body = exc.body
    if body is None:
        detail = ""
    elif isinstance(body, str):
        detail = body
    else:
        detail = json.dumps(body, ensure_ascii=False, default=str)
    return f"{exc.message} {detail}".lower()


def _names_format(text: str) -> bool:
    return any(word in text for word in _FORMAT_WORDS)


def classify(exc: openai.APIStatusError, model: str) -> ExtractionError | None:
    """The error to raise for an upstream's refusal; None when it refused our
    `response_format` (the next mode may work)."""
    status = exc.status_code
    text = _error_text(exc)
    code = (exc.code or "").lower()
    described = describe(exc)
    url = public_url(str(exc.request.url))
    # A rate limit may say "too many tokens" too: it is an outage, whatever it says.
    if status == 429:
        return ExtractionUnavailable(described)
    # Then: a prompt too long is refused the same in every mode.
    if code == "context_length_exceeded" or any(word in text for word in _CONTEXT_WORDS):
        return ExtractionError(
            "the prompt does not fit the extraction model's context (memory.llm.context_tokens"
            f" should be the model's context size): {described}",
            category="context_length",
        )
    if status in (401, 403):
        return ExtractionError(
            f"the extraction endpoint refused the key: {described}", category="auth"
        )
    if (
        code == "model_not_found"
        or (status == 404 and "model" in text)
        or (status in (400, 422) and _NO_SUCH_MODEL.search(text) and not _names_format(text))
    ):
        return ExtractionError(
            f"extraction model {model!r} not found at {url}; set a model it serves"
            f" ({MODEL_SETTINGS}): {described}",
            category="model_not_found",
        )
    if status == 404:
        return ExtractionError(
            f"{url} does not exist (404): does memory.llm.base_url lack /v1"
            f" (e.g. http://host:port/v1)? {described}",
            category="endpoint_not_found",
        )
    if status == 408:
        return ExtractionUnavailable(described)
    if _names_format(text) or status in (400, 422):
        return None
    if status >= 500:
        return ExtractionUnavailable(described)
    return ExtractionError(described)


def describe(exc: openai.APIStatusError) -> str:
    message = exc.message
    # A body without OpenAI's {"error": {"message"}} (Ollama's string, FastAPI's
    # `detail`) leaves the SDK's message bare: the body says what went wrong.
    if message.strip() == f"Error code: {exc.status_code}" and exc.body is not None:
        detail = (
            exc.body
            if isinstance(exc.body, str)
            else json.dumps(exc.body, ensure_ascii=False, default=str)
        )
        message = f"{message} - {detail}"
    message = message if len(message) <= 300 else message[:300] + "..."
    return f"extraction model answered {exc.status_code}: {message}"


def short(exc: openai.APIStatusError) -> str:
    """The gist of a refusal for a log line: one line, at most 160 characters."""
    text = " ".join(describe(exc).split(": ", 1)[-1].split())
    text = re.sub(r"^Error code: \d+( - )?", "", text) or f"HTTP {exc.status_code}"
    return text if len(text) <= 160 else text[:160] + "..."
