"""One LLM call per exchange: extract facts and decide how they change what is stored.

The answer is validated strictly. Anything malformed (wrong types, unknown ops,
aliases the model invented, truncated JSON) raises `ExtractionError`: the spool
retries the job and eventually parks it as failed, so a confused model can never
delete or overwrite a fact by accident.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import httpx
import msgspec

from memory.config import MemoryConfig
from memory.cookies import NoCookies
from memory.models import Exchange, Memory, Operation
from memory.prompts import OPERATIONS_SCHEMA, SCHEMA_NAME, build_messages

if TYPE_CHECKING:
    # Imported on first use: a serving process whose exchanges are extracted
    # elsewhere (memory/handoff.py) never pays its ~12 MiB.
    import openai

Mode = Literal["json_schema", "json_object", "text"]
# The shared client's own key when it is built before any user's key is known;
# every call then passes its key (`with_options`).
_UNTIL_A_KEY = "no-key-yet"
# Users' own keys whose client copies are kept (an LRU).
_CLIENTS_BY_KEY = 256
_MODES: tuple[Mode, ...] = ("json_schema", "json_object", "text")
# The model asked for when `memory.llm.model` is unset.
DEFAULT_MODEL = "gpt-4o-mini"
_OPS = ("ADD", "UPDATE", "DELETE", "NONE")
# A fact is one short sentence; a page of text is a model going off the rails.
MAX_FACT_CHARS = 1000
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "structured")


class ExtractionError(Exception):
    """The extraction call failed or its answer cannot be trusted; retry later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ExtractionUnavailable(ExtractionError):
    """The extraction model could not be reached or was overloaded (connection
    error, timeout, 429, 5xx): the job waits and retries without using up its
    attempts, so an outage never parks work as failed."""


def _rejects_format(exc: openai.APIStatusError) -> bool:
    """Did the upstream refuse the `response_format` rather than the request?"""
    if exc.status_code in (400, 422):
        return True
    if 400 <= exc.status_code < 500 and exc.status_code not in (401, 403, 408, 409, 429):
        text = f"{exc.message} {exc.body}".lower()
        return any(word in text for word in _FORMAT_WORDS)
    return False


def _response_format(mode: Mode) -> dict[str, Any] | None:
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": OPERATIONS_SCHEMA},
        }
    if mode == "json_object":
        # llama.cpp's server: json_object constrained by a `schema` field.
        return {"type": "json_object", "schema": OPERATIONS_SCHEMA}
    return None


def _balanced_object(text: str) -> str | None:
    """The first balanced `{...}` in `text`, aware of JSON strings."""
    start = text.find("{")
    while start != -1:
        depth = 0
        in_string = False
        escaped = False
        for i in range(start, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return None


def parse_json_answer(text: str) -> Any:
    """Decode the model's answer: bare JSON, fenced JSON or JSON inside prose."""
    stripped = text.strip()
    candidates = [stripped]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    obj = _balanced_object(text)
    if obj is not None:
        candidates.append(obj)
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    raise ExtractionError("the answer is not valid JSON (truncated or malformed)")


def validate_operations(data: Any, existing: Sequence[Memory]) -> list[Operation]:
    """Check the decoded answer and resolve aliases; all or nothing."""
    if not isinstance(data, dict):
        raise ExtractionError(f"expected a JSON object, got {type(data).__name__}")
    raw = data.get("operations")
    if not isinstance(raw, list):
        raise ExtractionError("`operations` is missing or not a list")
    aliases = {str(i): m.id for i, m in enumerate(existing)}
    touched: set[str] = set()
    ops: list[Operation] = []
    for n, item in enumerate(raw):
        where = f"operations[{n}]"
        if not isinstance(item, dict):
            raise ExtractionError(f"{where} is not an object")
        op = item.get("op")
        if not isinstance(op, str) or op.strip().upper() not in _OPS:
            raise ExtractionError(f"{where}: unknown op {op!r}")
        op = op.strip().upper()
        if op == "NONE":
            continue
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise ExtractionError(f"{where}: text must be a string")
        text = text.strip() if text else None
        if op in ("ADD", "UPDATE"):
            if not text:
                raise ExtractionError(f"{where}: {op} without text")
            if len(text) > MAX_FACT_CHARS:
                raise ExtractionError(f"{where}: text longer than {MAX_FACT_CHARS} characters")
        if op == "ADD":
            ops.append(Operation(op="ADD", text=text))
            continue
        alias = item.get("id")
        if isinstance(alias, int) and not isinstance(alias, bool):
            alias = str(alias)
        if not isinstance(alias, str):
            raise ExtractionError(f"{where}: {op} needs the id of a stored fact")
        alias = alias.strip()
        if alias not in aliases:
            raise ExtractionError(f"{where}: unknown id {alias!r}")
        if alias in touched:
            raise ExtractionError(f"{where}: more than one operation on id {alias!r}")
        touched.add(alias)
        if op == "UPDATE":
            ops.append(Operation(op="UPDATE", memory_id=aliases[alias], text=text))
        else:
            ops.append(Operation(op="DELETE", memory_id=aliases[alias]))
    return ops


class Extractor:
    """Calls the extraction model with the best structured-output mode it accepts."""

    def __init__(
        self,
        config: MemoryConfig,
        *,
        default_base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._config = config
        self._base_url = (config.llm.base_url or default_base_url or "").rstrip("/")
        self._http_client = http_client
        self._client: openai.AsyncOpenAI | None = None
        # Copies of `_client` for users' own keys, kept for the most recent ones.
        self._with_key: Callable[[str], openai.AsyncOpenAI] | None = None
        # The first mode that the upstream accepted, per (base_url, model).
        self._modes: dict[tuple[str, str], Mode] = {}
        # Calls in flight: the spool runs more jobs than the model should see
        # at once (`llm.max_concurrent_calls`).
        self._calls = asyncio.Semaphore(max(1, config.llm.max_concurrent_calls))

    @property
    def base_url(self) -> str:
        return self._base_url

    def mode(self) -> Mode | None:
        """The structured-output mode learned for the configured model, if any yet."""
        return self._modes.get((self._base_url, self._config.llm.model or DEFAULT_MODEL))

    def _client_for(self, api_key: str | None) -> openai.AsyncOpenAI:
        import openai

        if not self._base_url:
            raise ExtractionError("memory.llm.base_url is not set and there is no default upstream")
        key = api_key or self._config.llm.api_key
        if not key:
            raise ExtractionError("no API key for the extraction model")
        if self._client is None:
            # One client (and connection pool) for every key: per-call keys are
            # cheap copies sharing it. Retries are the spool's job, not the SDK's.
            shared = self._client = openai.AsyncOpenAI(
                api_key=key,
                base_url=self._base_url,
                max_retries=0,
                timeout=self._config.llm.timeout,
                # The SDK accepts a legacy httpx client as well as its httpx2 one.
                # Ours keeps no cookies: one client serves every user's key.
                http_client=self._http_client  # type: ignore[arg-type]
                or openai.DefaultAsyncHttpxClient(cookies=NoCookies()),
            )
            # A copy per call cost ~0.2 ms of the event loop (the SDK also
            # looks its platform up again, in a thread, for every new client).
            self._with_key = functools.lru_cache(maxsize=_CLIENTS_BY_KEY)(
                lambda key: shared.with_options(api_key=key)
            )
        if key == self._client.api_key:
            return self._client
        assert self._with_key is not None
        return self._with_key(key)

    def prepare(self) -> None:
        """Import the SDK and build the shared client now, at start-up: done by
        the first job instead, it held the event loop for ~0.7 s."""
        if self._base_url:
            self._client_for(self._config.llm.api_key or _UNTIL_A_KEY)
        else:
            import openai  # noqa: F401

    async def close(self) -> None:
        # A caller-supplied http_client belongs to the caller.
        if self._client is not None and self._http_client is None:
            await self._client.close()
        self._client = None
        self._with_key = None

    async def decide(
        self, exchange: Exchange, existing: list[Memory], *, api_key: str | None
    ) -> list[Operation]:
        """The validated operations for one exchange (empty: nothing to remember)."""
        import openai

        client = self._client_for(api_key)
        messages = build_messages(exchange, existing, self._config.prompts)
        key = (self._base_url, self._config.llm.model or DEFAULT_MODEL)
        learned = self._modes.get(key)
        modes = _MODES[_MODES.index(learned) :] if learned else _MODES
        last: openai.APIStatusError | None = None
        for mode in modes:
            try:
                async with self._calls:
                    content = await self._complete(client, messages, mode)
            except openai.APIStatusError as exc:
                if mode != "text" and _rejects_format(exc):
                    last = exc
                    continue
                if exc.status_code == 429 or exc.status_code >= 500:
                    raise ExtractionUnavailable(_describe(exc)) from None
                raise ExtractionError(_describe(exc)) from None
            self._modes[key] = mode
            return validate_operations(parse_json_answer(content), existing)
        assert last is not None
        raise ExtractionError(_describe(last))

    async def _complete(
        self, client: openai.AsyncOpenAI, messages: list[dict[str, str]], mode: Mode
    ) -> str:
        import openai

        llm = self._config.llm
        body: dict[str, Any] = {
            "model": llm.model or DEFAULT_MODEL,
            "messages": messages,
            "temperature": llm.temperature,
            "max_tokens": llm.max_tokens,
        }
        response_format = _response_format(mode)
        if response_format is not None:
            body["response_format"] = response_format
        try:
            # The SDK's client (auth, base URL, error mapping) without its typed
            # request transform and response models: they cost ~1.1 ms of CPU
            # per call, about half of the call (docs/benchmarks.md), for one
            # field we read.
            raw = await client.post("/chat/completions", body=body, cast_to=httpx.Response)
        except openai.APIStatusError:
            raise
        except openai.APIConnectionError as exc:
            raise ExtractionUnavailable(f"extraction model unreachable: {exc.message}") from None
        except openai.APIError as exc:
            raise ExtractionError(f"extraction call failed: {exc.message}") from None
        try:
            response = _decode_completion(raw.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ExtractionError(f"the answer is not a chat completion: {exc}") from None
        if not response.choices:
            raise ExtractionError("the answer has no choices")
        choice = response.choices[0]
        if choice.finish_reason == "length":
            raise ExtractionError("the answer was cut off (max_tokens reached)")
        content = choice.message.content
        if not content:
            refusal = choice.message.refusal
            raise ExtractionError(
                f"the answer is empty{f' (refusal: {refusal})' if refusal else ''}"
            )
        return content


class _Message(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct):
    message: _Message = msgspec.field(default_factory=_Message)
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)


_decode_completion = msgspec.json.Decoder(_Completion).decode


def _describe(exc: openai.APIStatusError) -> str:
    message = exc.message if len(exc.message) <= 300 else exc.message[:300] + "..."
    return f"extraction model answered {exc.status_code}: {message}"
