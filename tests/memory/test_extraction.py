"""One extraction call per exchange: what the model sees and what we accept back."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import pytest
from scripted_llm import Call, ScriptedLLM, completion, ops

from memory.config import LLMConfig, MemoryConfig
from memory.extraction import (
    DEFAULT_MODEL,
    KEYLESS,
    ExtractionError,
    ExtractionUnavailable,
    Extractor,
)
from memory.extraction_state import read_state
from memory.models import Operation
from tests.memory.helpers import EXISTING, error, llama_refuses_json_schema, refusing
from tests.memory.helpers import user_turn as exchange


class Endpoint:
    """A scripted model server: `GET /models` answered from `models`, chat
    completions by the ScriptedLLM; every listing request is recorded."""

    def __init__(
        self,
        llm: ScriptedLLM,
        models: list[str] | None = None,
        *,
        key: str | None = None,
        listing: httpx.Response | None = None,
    ) -> None:
        self.llm = llm
        self.models = models or []
        # Set: the listing answers 401 to any other Authorization.
        self.key = key
        # Set: the listing's answer, whatever the request.
        self.listing = listing
        self.listings: list[httpx.Request] = []

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET":
            return await self.llm.transport.handle_async_request(request)
        self.listings.append(request)
        if self.listing is not None:
            return self.listing
        if self.key is not None and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"error": {"message": "Incorrect API key"}})
        data = [{"id": m, "object": "model", "owned_by": "me"} for m in self.models]
        return httpx.Response(200, json={"object": "list", "data": data})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self._handle))


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="memory.extraction")
    return caplog


async def test_operations_come_back_with_aliases_resolved_to_ids(make):
    llm = ScriptedLLM(
        [
            ops(
                {"op": "UPDATE", "id": "0", "text": "User lives in Munich"},
                {"op": "DELETE", "id": "1"},
                {"op": "ADD", "text": "User has a cat named Miso"},
                {"op": "NONE"},
            )
        ]
    )
    result = await make(llm).decide(exchange("I moved to Munich"), EXISTING, api_key=None)
    assert result == [
        Operation(op="UPDATE", memory_id="id-berlin", text="User lives in Munich"),
        Operation(op="DELETE", memory_id="id-berlin".replace("berlin", "tea")),
        Operation(op="ADD", text="User has a cat named Miso"),
    ]


async def test_the_prompt_shows_aliases_the_exchange_and_its_date_but_no_uuids(make):
    llm = ScriptedLLM([ops()])
    await make(llm).decide(exchange("我下周五要去看牙医", reply="好的"), EXISTING, api_key=None)
    call = llm.calls[0]
    assert call.memories == [
        {"id": "0", "text": "User lives in Berlin"},
        {"id": "1", "text": "User likes green tea"},
    ]
    assert "id-berlin" not in call.prompt and "id-tea" not in call.prompt
    # Chinese is shown as Chinese, not \u escapes, so the model answers in kind.
    assert call.conversation == [
        {"role": "user", "content": "我下周五要去看牙医"},
        {"role": "assistant", "content": "好的"},
    ]
    assert "2026-03-13" in call.prompt and "Friday" in call.prompt
    assert "NEVER translate" in call.system
    assert call.body["model"] == "gpt-4o-mini"
    assert call.body["temperature"] == 0.0


async def test_empty_operations_mean_nothing_to_remember(make):
    llm = ScriptedLLM([ops()])
    assert await make(llm).decide(exchange("hi"), [], api_key=None) == []


async def test_the_request_key_is_used_when_given_else_the_configured_one(make):
    llm = ScriptedLLM([ops(), ops()])
    extractor = make(llm)
    await extractor.decide(exchange("a"), [], api_key="sk-user-key")
    await extractor.decide(exchange("b"), [], api_key=None)
    assert [c.authorization for c in llm.calls] == ["Bearer sk-user-key", "Bearer sk-config-key"]


async def test_each_users_key_gets_one_client_and_every_call_its_own_key(make, monkeypatch):
    import openai

    import memory.extraction

    monkeypatch.setattr(memory.extraction, "_CLIENTS_BY_KEY", 2)
    copies: list[str] = []
    with_options = openai.AsyncOpenAI.with_options

    def counted(self, **kwargs):
        copies.append(kwargs["api_key"])
        return with_options(self, **kwargs)

    monkeypatch.setattr(openai.AsyncOpenAI, "with_options", counted)
    keys = [None, "sk-a", "sk-b", "sk-a", "sk-c", "sk-b", None, "sk-a"]
    llm = ScriptedLLM([ops()] * len(keys))
    extractor = make(llm)
    for i, key in enumerate(keys):
        await extractor.decide(exchange(f"turn {i}"), [], api_key=key)
    assert [c.authorization for c in llm.calls] == [
        f"Bearer {key or 'sk-config-key'}" for key in keys
    ]
    # The configured key's client is the shared one; users' keys get copies,
    # reused while among the two most recently used.
    assert copies == ["sk-a", "sk-b", "sk-c", "sk-b", "sk-a"]


async def test_no_more_model_calls_are_in_flight_than_allowed(make):
    llm = ScriptedLLM(responder=lambda call: ops())
    extractor = make(llm, max_concurrent_calls=2)
    llm.hold()
    decisions = [
        asyncio.ensure_future(extractor.decide(exchange(f"turn {i}"), [], api_key=None))
        for i in range(5)
    ]
    await llm.entered.wait()
    for _ in range(20):
        await asyncio.sleep(0.01)
    # The model saw two; the other three wait in the gateway, no timeout running.
    assert len(llm.calls) == 2
    llm.release()
    assert await asyncio.gather(*decisions) == [[]] * 5
    assert len(llm.calls) == 5


async def test_strict_json_schema_is_tried_first_and_remembered(make):
    llm = ScriptedLLM([ops(), ops()])
    extractor = make(llm)
    await extractor.decide(exchange("a"), [], api_key=None)
    await extractor.decide(exchange("b"), [], api_key=None)
    fmt = llm.calls[0].body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["required"] == ["operations"]
    assert [c.response_format for c in llm.calls] == ["json_schema", "json_schema"]
    assert extractor.mode() == "json_schema"


async def test_a_server_refusing_json_schema_gets_json_object_with_the_schema(make):
    llm = ScriptedLLM([ops({"op": "ADD", "text": "User likes jazz"})] * 2, reject=("json_schema",))
    extractor = make(llm)
    first = await extractor.decide(exchange("I like jazz"), [], api_key=None)
    second = await extractor.decide(exchange("I like jazz"), [], api_key=None)
    assert first == second == [Operation(op="ADD", text="User likes jazz")]
    assert llm.calls[0].body["response_format"]["schema"]["type"] == "object"
    # Only the first call paid for the refusal.
    assert len(llm.rejected) == 1
    assert extractor.mode() == "json_object"


async def test_a_server_refusing_both_formats_gets_plain_text_and_prose_is_tolerated(make):
    answer = (
        'Sure! Here you go:\n```json\n{"operations": [{"op": "ADD", "text": "User is 34"}]}\n```'
    )
    llm = ScriptedLLM([answer, answer], reject=("json_schema", "json_object"))
    extractor = make(llm)
    assert await extractor.decide(exchange("I'm 34"), [], api_key=None) == [
        Operation(op="ADD", text="User is 34")
    ]
    assert "response_format" not in llm.calls[0].body
    await extractor.decide(exchange("I'm 34"), [], api_key=None)
    assert len(llm.rejected) == 2
    assert extractor.mode() == "text"


async def test_errors_that_are_not_about_the_format_do_not_trigger_fallback(make):
    llm = ScriptedLLM([httpx.Response(401, json={"error": {"message": "bad key"}})])
    extractor = make(llm)
    with pytest.raises(ExtractionError, match="401") as caught:
        await extractor.decide(exchange("a"), [], api_key=None)
    assert caught.value.category == "auth"
    assert [c.response_format for c in llm.calls] == ["json_schema"]
    assert extractor.mode() is None


async def test_an_answer_cut_off_by_max_tokens_is_rejected(make):
    llm = ScriptedLLM(
        [completion('{"operations": [{"op": "ADD", "text": "User li', finish_reason="length")]
    )
    with pytest.raises(ExtractionError, match="cut off") as caught:
        await make(llm).decide(exchange("a"), [], api_key=None)
    assert caught.value.category == "invalid_answer"


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(200, content=b"<html>gateway error</html>"),
        httpx.Response(200, json={"choices": "not a list"}),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json={"choices": [{"message": {"content": None}}]}),
    ],
)
async def test_a_200_that_is_not_a_usable_completion_is_an_untrustworthy_answer(make, reply):
    with pytest.raises(ExtractionError) as caught:
        await make(ScriptedLLM([reply])).decide(exchange("a"), [], api_key=None)
    assert not isinstance(caught.value, ExtractionUnavailable)
    assert caught.value.category == "invalid_answer"


# --- refusals: which fall through to the next mode, which are final ----------


async def test_a_500_naming_json_schema_is_a_refusal_and_json_object_is_tried(make, logs):
    jazz = ops({"op": "ADD", "text": "User likes jazz"})
    llm = ScriptedLLM(responder=refusing("json_schema", answer=jazz))
    extractor = make(llm)
    assert await extractor.decide(exchange("I like jazz"), [], api_key=None) == [
        Operation(op="ADD", text="User likes jazz")
    ]
    assert [c.response_format for c in llm.calls] == ["json_schema", "json_object"]
    assert llm.calls[1].body["response_format"]["schema"]["type"] == "object"
    assert extractor.mode() == "json_object"
    [warning] = [r for r in logs.records if r.levelno == logging.WARNING]
    assert "json_schema refused (HTTP 500" in warning.getMessage()
    assert "response_format" in warning.getMessage()
    assert "trying json_object" in warning.getMessage()
    [learned] = [r for r in logs.records if r.levelno == logging.INFO]
    assert learned.getMessage() == (
        "extraction at http://upstream.test/v1 model gpt-4o-mini uses json_object"
    )


async def test_when_every_mode_is_refused_the_category_says_so(make):
    llm = ScriptedLLM(responder=refusing("json_schema", "json_object", None))
    with pytest.raises(ExtractionError, match="every structured-output mode") as caught:
        await make(llm).decide(exchange("a"), [], api_key=None)
    assert caught.value.category == "format_rejected"
    assert [c.response_format for c in llm.calls] == ["json_schema", "json_object", None]


# --- the learned mode, across restarts ---------------------------------------


async def test_the_learned_mode_is_used_first_after_a_restart(make, tmp_path):
    state = tmp_path / "extraction-state.json"
    first = make(ScriptedLLM(responder=refusing("json_schema")), state_path=state)
    await first.decide(exchange("a"), [], api_key=None)
    assert read_state(state).mode == "json_object"

    llm = ScriptedLLM(responder=refusing("json_schema"))
    restarted = make(llm, state_path=state)
    assert restarted.mode() == "json_object"
    await restarted.decide(exchange("b"), [], api_key=None)
    assert [c.response_format for c in llm.calls] == ["json_object"]


async def test_a_restart_says_once_which_mode_it_learned_earlier(make, tmp_path, logs):
    state = tmp_path / "extraction-state.json"
    await make(ScriptedLLM(responder=refusing("json_schema")), state_path=state).decide(
        exchange("a"), [], api_key=None
    )
    logs.clear()
    make(ScriptedLLM(), state_path=state).prepare()
    said = [r.getMessage() for r in logs.records if "learned on an earlier run" in r.getMessage()]
    assert len(said) == 1 and "uses json_object" in said[0]


async def test_a_learned_mode_refused_later_is_probed_again_from_the_top_and_saved(
    make, tmp_path, logs
):
    state = tmp_path / "extraction-state.json"
    await make(ScriptedLLM(responder=refusing("json_schema")), state_path=state).decide(
        exchange("a"), [], api_key=None
    )
    # The server was upgraded: json_schema works now, json_object no longer.
    refusal = lambda: error(400, "response_format json_object is no longer supported")  # noqa: E731
    llm = ScriptedLLM(responder=refusing("json_object", refusal=refusal))
    extractor = make(llm, state_path=state)
    await extractor.decide(exchange("b"), [], api_key=None)
    assert [c.response_format for c in llm.calls] == ["json_object", "json_schema"]
    assert extractor.mode() == "json_schema"
    assert read_state(state).mode == "json_schema"
    assert "uses json_schema (was json_object)" in logs.text


async def test_a_corrupt_state_file_is_started_afresh(make, tmp_path, logs):
    state = tmp_path / "extraction-state.json"
    state.write_text('{"modes": [{"endpoint": "http://upstream.test/v1", "mo')
    llm = ScriptedLLM([ops()])
    extractor = make(llm, state_path=state)
    assert extractor.mode() is None
    assert "unreadable" in logs.text
    await extractor.decide(exchange("a"), [], api_key=None)
    assert llm.calls[0].response_format == "json_schema"
    assert read_state(state).mode == "json_schema"


async def test_the_mode_is_logged_once_not_per_call(make, logs):
    extractor = make(ScriptedLLM([ops(), ops(), ops()]))
    for text in "abc":
        await extractor.decide(exchange(text), [], api_key=None)
    assert [r.getMessage() for r in logs.records] == [
        "extraction at http://upstream.test/v1 model gpt-4o-mini uses json_schema"
    ]


# --- the model: configured, or what the endpoint lists -------------------------


async def test_an_unset_model_becomes_the_one_model_a_local_server_lists(make, tmp_path, logs):
    gguf = "/models/SmolLM2-135M-Instruct-Q8_0.gguf"
    llm = ScriptedLLM([ops()], keyless=True)
    state = tmp_path / "extraction-state.json"
    extractor = make(Endpoint(llm, [gguf]), api_key=None, state_path=state)
    probe = await extractor.probe()
    assert (probe.model, probe.models, probe.error) == (gguf, [gguf], None)
    assert extractor.model == gguf
    assert f"uses {gguf}, the one model it lists" in logs.text
    await extractor.decide(exchange("a"), [], api_key=None)
    assert llm.calls[0].body["model"] == gguf
    assert read_state(state).model == gguf


async def test_after_a_restart_the_model_found_last_time_is_used_until_the_next_probe(
    make, tmp_path
):
    state = tmp_path / "extraction-state.json"
    await make(Endpoint(ScriptedLLM(), ["local-model"]), state_path=state).probe()
    llm = ScriptedLLM([ops()])
    restarted = make(llm, state_path=state)
    assert restarted.model == "local-model"
    await restarted.decide(exchange("a"), [], api_key=None)
    assert llm.calls[0].body["model"] == "local-model"
    # A configured model always wins.
    assert make(ScriptedLLM(), state_path=state, model="qwen2.5:7b").model == "qwen2.5:7b"


async def test_an_unset_model_stays_the_default_where_the_endpoint_lists_it(make, logs):
    extractor = make(Endpoint(ScriptedLLM(), ["gpt-4o", DEFAULT_MODEL, "o3"]))
    assert (await extractor.probe()).model == DEFAULT_MODEL
    assert not [r for r in logs.records if r.levelno >= logging.WARNING]


async def test_an_unset_model_the_endpoint_does_not_list_gets_one_warning_naming_the_settings(
    make, logs
):
    listed = [f"llama3.2:{n}b" for n in range(1, 13)]
    extractor = make(Endpoint(ScriptedLLM(), listed))
    assert (await extractor.probe()).model == DEFAULT_MODEL
    [warning] = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    for setting in ("memory.llm.model", "gateway.yaml", "--extraction-model", "MEMORY_LLM_MODEL"):
        assert setting in warning
    assert "llama3.2:1b, llama3.2:2b" in warning
    assert "llama3.2:10b and 2 more" in warning


async def test_a_configured_model_is_kept_and_a_missing_one_named_in_a_warning(make, logs):
    llm = ScriptedLLM([ops()])
    extractor = make(Endpoint(llm, ["qwen2.5:7b"]), model="qwen2.5:14b")
    assert (await extractor.probe()).model == "qwen2.5:14b"
    [warning] = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert "qwen2.5:14b is not among the models" in warning
    assert "qwen2.5:7b" in warning
    await extractor.decide(exchange("a"), [], api_key=None)
    assert llm.calls[0].body["model"] == "qwen2.5:14b"


@pytest.mark.parametrize(
    "listing",
    [
        httpx.Response(404, text="404 page not found"),
        httpx.Response(200, text="<html>a login page</html>"),
    ],
)
async def test_a_failed_listing_keeps_the_default_and_never_raises(make, logs, listing):
    extractor = make(Endpoint(ScriptedLLM(), listing=listing))
    probe = await extractor.probe()
    assert (probe.model, probe.models, probe.open) == (DEFAULT_MODEL, None, False)
    assert probe.error is not None and "http://upstream.test/v1/models" in probe.error
    assert "memory.llm.model" in logs.text


async def test_an_unreachable_endpoint_keeps_the_default_and_never_raises(make, logs):
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    class Down:
        def client(self) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.MockTransport(unreachable))

    extractor = make(Down())
    probe = await extractor.probe()
    assert (probe.model, probe.models, probe.open) == (DEFAULT_MODEL, None, False)
    assert "unreachable" in (probe.error or "")
    # The engine probes again while it stays down: one warning, not one per probe.
    for _ in range(3):
        await extractor.probe()
    warned = [r for r in logs.records if "cannot list the models" in r.getMessage()]
    assert [r.levelname for r in warned] == ["WARNING"]


async def test_the_listing_is_tried_without_a_key_then_with_the_configured_one(make, logs):
    endpoint = Endpoint(ScriptedLLM(), [DEFAULT_MODEL], key="sk-config-key")
    extractor = make(endpoint)
    probe = await extractor.probe()
    assert (probe.models, probe.open) == ([DEFAULT_MODEL], False)
    assert [r.headers.get("authorization") for r in endpoint.listings] == [
        None,
        "Bearer sk-config-key",
    ]
    assert "sk-config-key" not in logs.text


async def test_the_key_of_the_endpoints_upstream_counts_as_configured():
    """`memory.llm.api_key` unset: the gateway passes the key configured for the
    upstream the extraction endpoint belongs to."""
    llm = ScriptedLLM([ops()])
    endpoint = Endpoint(llm, [DEFAULT_MODEL], key="sk-upstream-key")
    async with endpoint.client() as client:
        extractor = Extractor(
            MemoryConfig(llm=LLMConfig(api_key=None)),
            default_base_url="http://upstream.test/v1",
            http_client=client,
            api_key="sk-upstream-key",
        )
        assert not extractor.needs_key
        assert (await extractor.probe()).models == [DEFAULT_MODEL]
        await extractor.decide(exchange("a"), [], api_key=None)
    assert llm.calls[0].authorization == "Bearer sk-upstream-key"


async def test_a_listing_that_wants_a_key_nobody_configured_is_only_noted(make, logs):
    endpoint = Endpoint(ScriptedLLM(), [DEFAULT_MODEL], key="sk-someone")
    extractor = make(endpoint, api_key=None)
    probe = await extractor.probe()
    assert (probe.model, probe.open, probe.error) == (
        DEFAULT_MODEL,
        False,
        "GET http://upstream.test/v1/models answered 401",
    )
    assert len(endpoint.listings) == 1
    assert extractor.needs_key
    assert not [r for r in logs.records if r.levelno >= logging.WARNING]


# --- keyless endpoints -----------------------------------------------------------


async def test_an_open_endpoint_is_called_without_any_key(make):
    llm = ScriptedLLM([ops()], keyless=True)
    endpoint = Endpoint(llm, ["local-model"])
    extractor = make(endpoint, api_key=None)
    assert (await extractor.probe()).open
    assert not extractor.needs_key
    await extractor.decide(exchange("a"), [], api_key=None)
    assert [r.headers.get("authorization") for r in endpoint.listings] == [None]
    assert [c.authorization for c in llm.calls] == [""]


async def test_before_the_endpoint_answered_a_call_goes_without_a_key_and_learns(make):
    """Down at start-up, the endpoint's needs are unknown: a job's call goes
    without a key (no key can leak that way). A refusal (401) means keys are
    needed: the job waits for one (`no_key`), and so do the next ones."""
    llm = ScriptedLLM()  # like OpenAI: a call without a key is a 401
    extractor = make(llm, api_key=None)
    assert not extractor.needs_key
    with pytest.raises(ExtractionError) as caught:
        await extractor.decide(exchange("a"), [], api_key=None)
    assert caught.value.category == "no_key"
    assert extractor.needs_key
    with pytest.raises(ExtractionError) as caught:
        await extractor.decide(exchange("b"), [], api_key=None)
    assert caught.value.category == "no_key"
    assert len(llm.unauthorized) == 1 and llm.calls == []


async def test_the_keyless_placeholder_never_goes_out_as_a_key(make):
    llm = ScriptedLLM([ops(), ops()], keyless=True)
    extractor = make(llm, api_key=None)
    await extractor.decide(exchange("a"), [], api_key=KEYLESS)
    await extractor.decide(exchange("b"), [], api_key="sk-user-key")
    assert [c.authorization for c in llm.calls] == ["", "Bearer sk-user-key"]


async def test_a_configured_key_means_no_key_is_needed_from_users(make):
    assert not make(ScriptedLLM()).needs_key


# --- yielding to chat, and what the stats show -----------------------------------


async def test_each_call_is_made_inside_the_gate(make):
    """The gate is entered around every call, fallbacks included: nothing
    reaches the model outside it, and each call leaves it before the next
    one enters (the gateway's gate lets one call through at a time)."""
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def call_gate():
        events.append("enter")
        await asyncio.sleep(0)  # let the other job run, if it could
        try:
            yield
        finally:
            events.append("leave")

    def respond(call: Call):
        events.append(f"call {call.response_format}")
        return llama_refuses_json_schema() if call.response_format == "json_schema" else ops()

    extractor = make(ScriptedLLM(responder=respond), call_gate=call_gate, max_concurrent_calls=1)
    await asyncio.gather(
        extractor.decide(exchange("a"), [], api_key=None),
        extractor.decide(exchange("b"), [], api_key=None),
    )
    assert events == [
        "enter",
        "call json_schema",
        "leave",
        "enter",
        "call json_schema",
        "leave",
        "enter",
        "call json_object",
        "leave",
        "enter",
        "call json_object",
        "leave",
    ]


async def test_the_last_success_and_the_last_error_are_kept_with_no_key_in_them(make):
    leaky = error(400, "Incorrect API key provided: sk-user-secret-key", code="invalid_api_key")
    extractor = make(ScriptedLLM([ops(), httpx.Response(401, json=leaky.json())]))
    assert (extractor.last_success_at, extractor.last_error) == (None, None)
    await extractor.decide(exchange("a"), [], api_key=None)
    assert extractor.last_success_at is not None
    with pytest.raises(ExtractionError) as caught:
        await extractor.decide(exchange("b"), [], api_key="sk-user-secret-key")
    assert extractor.last_error == caught.value.reason
    assert extractor.last_error_at is not None and extractor.last_error_at >= (
        extractor.last_success_at
    )
    assert "sk-user-secret-key" not in extractor.last_error
    assert "sk-user-secret-key" not in str(caught.value)
