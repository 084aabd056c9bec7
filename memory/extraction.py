"""One LLM call per exchange: extract facts and decide how they change what is stored.

The answer is read by memory/extraction_answer.py (lenient JSON, strict
operations); failures are classified by memory/extraction_errors.py.

Model servers differ in which structured-output mode they accept and in how
they refuse the others (llama-cpp-python answers `json_schema` with a 500), so
the modes are tried in order and the one that works is remembered per endpoint
and model, across restarts (memory/extraction_state.py). Every failure carries
a `category` that tells the spool whether retrying can help.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from memory.config import MemoryConfig
from memory.cookies import NoCookies
from memory.extraction_answer import invalid_answer, parse_json_answer, validate_operations
from memory.extraction_errors import (
    FOR_GOOD_CATEGORIES,
    MODEL_SETTINGS,
    ExtractionError,
    ExtractionUnavailable,
    classify,
    describe,
    short,
)
from memory.extraction_state import MODES, ExtractionState, Mode
from memory.models import Exchange, Memory, Operation
from memory.observer import NO_OBSERVER, Observer
from memory.prompts import OPERATIONS_SCHEMA, SCHEMA_NAME, build_prompt
from memory.redaction import REDACTED, public_url

if TYPE_CHECKING:
    # Imported on first use: a serving process whose exchanges are extracted
    # elsewhere (memory/handoff.py) never pays its ~12 MiB.
    import openai

__all__ = [
    "DEFAULT_MODEL",
    "FOR_GOOD_CATEGORIES",
    "KEYLESS",
    "ExtractionError",
    "ExtractionUnavailable",
    "Extractor",
    "Mode",
    "Probe",
    "parse_json_answer",
    "validate_operations",
]

log = logging.getLogger("memory.extraction")

# Entered around each call to the model (and the start-up listing): the
# gateway holds calls back while users' chats to a one-slot local server are
# in flight, and lets one through at a time.
CallGate = Callable[[], AbstractAsyncContextManager[object]]

# The shared client's own key when it is built before any user's key is known;
# every call then passes its key (`with_options`).
_UNTIL_A_KEY = "no-key-yet"
# The key of a call to an endpoint that needs none (a local vLLM, Ollama,
# llama.cpp): such calls carry no Authorization header at all.
KEYLESS = "no-key"
# Users' own keys whose client copies are kept (an LRU).
_CLIENTS_BY_KEY = 256
_MODES: tuple[Mode, ...] = MODES
# The model asked for when `memory.llm.model` is unset and the endpoint does
# not say which one it serves.
DEFAULT_MODEL = "gpt-4o-mini"
# `GET /models` at start-up must not hold it up.
_PROBE_TIMEOUT = 5.0
# Models named in a log line, at most.
_MODELS_SHOWN = 10


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    """What the extraction endpoint's `GET /models` said at start-up."""

    # The model extraction calls ask for.
    model: str
    # The ids it lists; None when the listing failed.
    models: list[str] | None
    # It answered the listing without any key: calls may go without one.
    open: bool
    # Why the listing failed, if it did.
    error: str | None
    # False when nothing answered (down, or a wrong address): probe again later.
    reachable: bool = True


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


class Extractor:
    """Calls the extraction model with the best structured-output mode it accepts."""

    def __init__(
        self,
        config: MemoryConfig,
        *,
        default_base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        api_key: str | None = None,
        state_path: Path | None = None,
        call_gate: CallGate | None = None,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self._config = config
        self._observer = observer
        # Whether the "cannot list the models" warning was given (once per process).
        self._said_unlisted = False
        # The key configured for the endpoint (`memory.llm.api_key`, or the key
        # of the upstream it belongs to); users' keys come with each call.
        self._api_key = api_key or config.llm.api_key
        self._base_url = (config.llm.base_url or default_base_url or "").rstrip("/")
        self._http_client = http_client
        self._client: openai.AsyncOpenAI | None = None
        # Copies of `_client` for users' own keys, kept for the most recent ones.
        self._with_key: Callable[[str], openai.AsyncOpenAI] | None = None
        # The modes learned per (base_url, model), and the endpoint and model in
        # use; in `state_path` (the data dir) when given, else in memory only.
        self._state = ExtractionState(state_path)
        # Awaited before each call to the model: the gateway lets users' chats
        # to a one-slot local server go first.
        self._call_gate = call_gate
        # Calls in flight: the spool runs more jobs than the model should see
        # at once (`llm.max_concurrent_calls`).
        self._calls = asyncio.Semaphore(max(1, config.llm.max_concurrent_calls))
        # Until `probe()`: the configured model, else the one this endpoint
        # used last time, else the default.
        known = self._state.model if self._state.endpoint == public_url(self._base_url) else None
        self._model = config.llm.model or known or DEFAULT_MODEL
        # Whether calls need a key: True once the endpoint refused a call or
        # its listing without one (401/403), False once it answered without
        # one, None while unknown (calls go without a key and find out).
        self._key_required: bool | None = None
        self.probed: Probe | None = None
        # For the stats of the process that runs the jobs (time.time()).
        self.last_success_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def model(self) -> str:
        """The model every extraction call asks for."""
        return self._model

    @property
    def needs_key(self) -> bool:
        """Whether a call needs a user's key: none is configured and the
        endpoint did not answer without one."""
        return not self._api_key and self._key_required is True

    def mode(self) -> Mode | None:
        """The structured-output mode learned for the model in use, if any yet."""
        return self._state.mode(self._base_url, self._model)

    async def probe(self) -> Probe:
        """Ask the endpoint which models it serves (`GET /models`) and settle the
        model to use; never raises, logs what the operator should change."""
        models, is_open, error, status = await self._list_models()
        self._model = self._choose_model(models, error, status)
        if is_open:
            self._key_required = False
        elif status in (401, 403):
            self._key_required = True
        self.probed = Probe(
            model=self._model,
            models=models,
            open=is_open,
            error=error,
            reachable=error is None or status is not None,
        )
        if self._base_url:
            self._state.use(self._base_url, self._model)
            await self._state.save()
        return self.probed

    async def _list_models(self) -> tuple[list[str] | None, bool, str | None, int | None]:
        """(ids, open, error, status) of `GET {base_url}/models`: first without
        any key, then with the configured one if a key is required."""
        if not self._base_url:
            return (
                None,
                False,
                "memory.llm.base_url is not set and there is no default upstream",
                None,
            )
        url = f"{self._base_url}/models"
        shown = public_url(url)
        client = self._http_client or httpx.AsyncClient(cookies=NoCookies())
        try:
            # A one-slot server serves its listing like a completion
            # (llama-cpp-python would cut a user's stream for it).
            async with self._gated():
                response = await self._get(client, url, None)
                is_open = response.status_code == 200
                key = self._api_key
                if response.status_code in (401, 403) and key:
                    response = await self._get(client, url, key)
        except Exception as exc:  # unreachable, timed out, or a malformed base_url
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return None, False, f"{shown} unreachable ({reason[:200]})", None
        finally:
            if client is not self._http_client:
                await client.aclose()
        status = response.status_code
        if status != 200:
            return None, is_open, f"GET {shown} answered {status}", status
        try:
            return _model_ids(response.json()), is_open, None, status
        except ValueError:
            # A login page is no sign that calls may go without a key.
            return None, False, f"GET {shown} answered 200 without a model list", status

    @staticmethod
    async def _get(client: httpx.AsyncClient, url: str, key: str | None) -> httpx.Response:
        request = client.build_request("GET", url, timeout=_PROBE_TIMEOUT)
        # No default header of a shared client may lend a key to the first try.
        request.headers.pop("authorization", None)
        if key is not None:
            request.headers["authorization"] = f"Bearer {key}"
        return await client.send(request)

    def _choose_model(self, models: list[str] | None, error: str | None, status: int | None) -> str:
        configured = self._config.llm.model
        at = public_url(self._base_url) or "(no endpoint)"
        if configured:
            if models is not None and configured not in models:
                log.warning(
                    "extraction model %s is not among the models %s lists (%s): calls will"
                    " fail unless it serves it anyway; set one it serves (%s)",
                    configured,
                    at,
                    _some(models),
                    MODEL_SETTINGS,
                )
            elif error is not None:
                log.info("cannot list the models of %s (%s): using %s", at, error, configured)
            return configured
        if models is not None:
            if DEFAULT_MODEL in models:
                return DEFAULT_MODEL
            if len(models) == 1:
                log.info(
                    "memory.llm.model is unset: extraction at %s uses %s, the one model it lists",
                    at,
                    models[0],
                )
                return models[0]
            log.warning(
                "memory.llm.model is unset and %s does not list %s (it lists %s): extraction"
                " asks for %s and will likely fail; set the model to use: %s",
                at,
                DEFAULT_MODEL,
                _some(models),
                DEFAULT_MODEL,
                MODEL_SETTINGS,
            )
            return DEFAULT_MODEL
        # A hosted API that wants a key for its listing serves the default.
        level = logging.INFO if status in (401, 403) else logging.WARNING
        if self._said_unlisted:
            # The probe asks again while the endpoint is down: said once is enough.
            level = logging.DEBUG
        self._said_unlisted = True
        log.log(
            level,
            "cannot list the models of %s (%s): extraction asks for %s; if it does not"
            " serve it, set the model to use: %s",
            at,
            error,
            DEFAULT_MODEL,
            MODEL_SETTINGS,
        )
        return DEFAULT_MODEL

    def _client_for(self, api_key: str | None) -> openai.AsyncOpenAI:
        import openai

        if not self._base_url:
            raise ExtractionError("memory.llm.base_url is not set and there is no default upstream")
        key = api_key or self._api_key
        if not key:
            if self._key_required:
                raise ExtractionError("no API key for the extraction model", category="no_key")
            key = KEYLESS
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

    def _gated(self) -> AbstractAsyncContextManager[object]:
        return self._call_gate() if self._call_gate is not None else contextlib.nullcontext()

    def prepare(self) -> None:
        """Import the SDK and build the shared client now, at start-up: done by
        the first job instead, it held the event loop for ~0.7 s."""
        if self._base_url:
            self._client_for(self._api_key or _UNTIL_A_KEY)
            known = self._state.mode(self._base_url, self._model)
            if known is not None:
                # Said once per start: the mode learned on an earlier run.
                log.info(
                    "extraction at %s model %s uses %s (learned on an earlier run)",
                    public_url(self._base_url),
                    self._model,
                    known,
                )
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
        key = api_key or self._api_key
        try:
            ops = await self._decide(exchange, existing, api_key)
        except ExtractionError as exc:
            # An upstream error echoing the key must not be kept or logged.
            if key and len(key) >= 8 and key in exc.reason:
                exc.reason = exc.reason.replace(key, REDACTED)
                exc.args = (exc.reason,)
            self.last_error, self.last_error_at = exc.reason, time.time()
            raise
        self.last_success_at = time.time()
        return ops

    async def _decide(
        self, exchange: Exchange, existing: list[Memory], api_key: str | None
    ) -> list[Operation]:
        import openai

        client = self._client_for(api_key)
        keyless = (api_key or self._api_key or KEYLESS) == KEYLESS
        llm = self._config.llm
        prompt = build_prompt(
            exchange,
            existing,
            self._config.prompts,
            context_tokens=llm.context_tokens,
            max_tokens=llm.max_tokens,
        )
        messages = prompt.messages
        # Only the memories that fit the prompt have aliases the model may use.
        existing = existing[: prompt.memories_shown]
        model = self._model
        learned = self._state.mode(self._base_url, model)
        # The learned mode first; if it is refused now, the others from the top.
        modes = (learned, *(m for m in _MODES if m != learned)) if learned else _MODES
        last: openai.APIStatusError | None = None
        for i, mode in enumerate(modes):
            try:
                async with self._calls, self._gated():
                    content = await self._complete(client, messages, mode, model, keyless)
            except openai.APIStatusError as exc:
                error = classify(exc, model)
                if error is not None and error.category == "auth" and keyless:
                    # Calls need a key after all: the job waits for one.
                    self._key_required = True
                    raise ExtractionError(
                        f"the extraction endpoint wants a key: {error.reason}", category="no_key"
                    ) from None
                if error is not None:
                    raise error from None
                last = exc
                following = modes[i + 1] if i + 1 < len(modes) else None
                log.warning(
                    "extraction at %s model %s: %s refused (HTTP %d: %s); %s",
                    public_url(self._base_url),
                    model,
                    mode,
                    exc.status_code,
                    short(exc),
                    f"trying {following}" if following else "no mode left",
                )
                continue
            await self._learned(model, mode)
            return validate_operations(parse_json_answer(content), existing)
        assert last is not None
        raise ExtractionError(
            f"every structured-output mode was refused; last: {describe(last)}",
            category="format_rejected",
        )

    async def _learned(self, model: str, mode: Mode) -> None:
        before = self._state.set_mode(self._base_url, model, mode)
        self._state.use(self._base_url, model)
        if before != mode:
            log.info(
                "extraction at %s model %s uses %s%s",
                public_url(self._base_url),
                model,
                mode,
                f" (was {before})" if before else "",
            )
        await self._state.save()

    async def _complete(
        self,
        client: openai.AsyncOpenAI,
        messages: list[dict[str, str]],
        mode: Mode,
        model: str,
        keyless: bool,
    ) -> str:
        import openai

        llm = self._config.llm
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": llm.temperature,
            "max_tokens": llm.max_tokens,
        }
        response_format = _response_format(mode)
        if response_format is not None:
            body["response_format"] = response_format
        options: Any = {"headers": {"Authorization": openai.Omit()}} if keyless else {}
        try:
            # The SDK's client (auth, base URL, error mapping) without its typed
            # request transform and response models: they cost ~1.1 ms of CPU
            # per call, about half of the call (docs/benchmarks.md), for one
            # field we read.
            raw = await client.post(
                "/chat/completions", body=body, cast_to=httpx.Response, options=options
            )
        except openai.APIStatusError:
            raise
        except openai.APIConnectionError as exc:
            raise ExtractionUnavailable(f"extraction model unreachable: {exc.message}") from None
        except openai.APIError as exc:
            raise ExtractionError(f"extraction call failed: {exc.message}") from None
        try:
            response = _decode_completion(raw.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise invalid_answer(f"the answer is not a chat completion: {exc}") from None
        usage = response.usage
        if usage is not None:
            self._observer.llm_tokens(usage.prompt_tokens or 0, usage.completion_tokens or 0)
        if not response.choices:
            raise invalid_answer("the answer has no choices")
        choice = response.choices[0]
        if choice.finish_reason == "length":
            raise invalid_answer(
                "the answer was cut off (max_tokens reached:"
                f" memory.llm.max_tokens={llm.max_tokens})"
            )
        content = choice.message.content
        if not content:
            refusal = choice.message.refusal
            raise invalid_answer(
                f"the answer is empty{f' (refusal: {refusal})' if refusal else ''}"
            )
        return content


class _Message(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct):
    message: _Message = msgspec.field(default_factory=_Message)
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    # Some servers send nulls here; a usage they cannot count is not an error.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None


_decode_completion = msgspec.json.Decoder(_Completion).decode


def _model_ids(body: Any) -> list[str]:
    """The ids of an OpenAI-style model list (`data`), or Ollama's (`models`)."""
    if isinstance(body, dict):
        for field, names in (("data", ("id",)), ("models", ("model", "name", "id"))):
            items = body.get(field)
            if isinstance(items, list):
                ids = []
                for item in items:
                    name = next(
                        (item[n] for n in names if isinstance(item, dict) and n in item), None
                    )
                    if isinstance(name, str):
                        ids.append(name)
                return ids
    raise ValueError("not a model list")


def _some(models: list[str]) -> str:
    if not models:
        return "none"
    shown = ", ".join(models[:_MODELS_SHOWN])
    more = len(models) - _MODELS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown
