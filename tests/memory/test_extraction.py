"""One extraction call per exchange: what the model sees and what we accept back."""

import asyncio
from datetime import UTC, datetime

import httpx
import pytest
from scripted_llm import ScriptedLLM, completion, ops

from memory.config import LLMConfig, MemoryConfig
from memory.extraction import (
    ExtractionError,
    ExtractionUnavailable,
    Extractor,
    parse_json_answer,
    validate_operations,
)
from memory.models import Exchange, Memory, Operation, Scope

AT = datetime(2026, 3, 13, 9, 30, tzinfo=UTC)  # a Friday


def memory(mid: str, text: str) -> Memory:
    return Memory(
        id=mid,
        user_id="u",
        agent_id=None,
        session_id=None,
        text=text,
        metadata={},
        created_at=AT,
        updated_at=AT,
    )


EXISTING = [memory("id-berlin", "User lives in Berlin"), memory("id-tea", "User likes green tea")]


def exchange(text: str, reply: str | None = "Noted!") -> Exchange:
    return Exchange(
        scope=Scope(user_id="u"), messages=[{"role": "user", "content": text}], reply=reply, at=AT
    )


@pytest.fixture
async def make():
    clients = []

    def make(llm: ScriptedLLM, **llm_config) -> Extractor:
        client = llm.client()
        clients.append(client)
        config = MemoryConfig(llm=LLMConfig(api_key="sk-config-key", **llm_config))
        return Extractor(config, default_base_url="http://upstream.test/v1", http_client=client)

    yield make
    for c in clients:
        await c.aclose()


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
    with pytest.raises(ExtractionError, match="401"):
        await extractor.decide(exchange("a"), [], api_key=None)
    assert [c.response_format for c in llm.calls] == ["json_schema"]
    assert extractor.mode() is None


async def test_server_errors_are_outages_for_the_spool_to_wait_out(make):
    llm = ScriptedLLM([httpx.Response(503, json={"error": {"message": "overloaded"}})])
    with pytest.raises(ExtractionUnavailable, match="503"):
        await make(llm).decide(exchange("a"), [], api_key=None)
    assert len(llm.calls) == 1  # no SDK retries: the spool owns retrying


async def test_an_answer_cut_off_by_max_tokens_is_rejected(make):
    llm = ScriptedLLM(
        [completion('{"operations": [{"op": "ADD", "text": "User li', finish_reason="length")]
    )
    with pytest.raises(ExtractionError, match="cut off"):
        await make(llm).decide(exchange("a"), [], api_key=None)


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


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("I cannot help with that.", "not valid JSON"),
        ('{"operations": [{"op": "ADD", "text": "User li', "not valid JSON"),
        ('["ADD"]', "expected a JSON object"),
        ('{"ops": []}', "operations"),
        ('{"operations": {"op": "ADD"}}', "operations"),
        ('{"operations": ["ADD"]}', "not an object"),
        ('{"operations": [{"op": "MERGE", "id": "0"}]}', "unknown op"),
        ('{"operations": [{"op": 1}]}', "unknown op"),
        ('{"operations": [{"op": "ADD"}]}', "ADD without text"),
        ('{"operations": [{"op": "ADD", "text": "   "}]}', "ADD without text"),
        ('{"operations": [{"op": "ADD", "text": 42}]}', "text must be a string"),
        ('{"operations": [{"op": "UPDATE", "id": "0"}]}', "UPDATE without text"),
        ('{"operations": [{"op": "UPDATE", "id": "7", "text": "x"}]}', "unknown id"),
        ('{"operations": [{"op": "DELETE", "id": "id-berlin"}]}', "unknown id"),
        ('{"operations": [{"op": "DELETE"}]}', "needs the id"),
        ('{"operations": [{"op": "DELETE", "id": ["0"]}]}', "needs the id"),
        (
            '{"operations": [{"op": "DELETE", "id": "0"},'
            ' {"op": "UPDATE", "id": "0", "text": "x"}]}',
            "more than one operation",
        ),
        ('{"operations": [{"op": "ADD", "text": "' + "x" * 2000 + '"}]}', "longer than"),
    ],
)
def test_untrustworthy_answers_are_rejected_whole(answer, reason):
    with pytest.raises(ExtractionError, match=reason):
        validate_operations(parse_json_answer(answer), EXISTING)


def test_a_valid_op_next_to_an_invalid_one_is_not_applied_alone():
    answer = '{"operations": [{"op": "DELETE", "id": "0"}, {"op": "DELETE", "id": "9"}]}'
    with pytest.raises(ExtractionError):
        validate_operations(parse_json_answer(answer), EXISTING)


def test_small_model_quirks_that_are_unambiguous_are_accepted():
    answer = (
        'Result: {"operations": [{"op": "update", "id": 0, "text": " User lives in Rome "}]} done'
    )
    assert validate_operations(parse_json_answer(answer), EXISTING) == [
        Operation(op="UPDATE", memory_id="id-berlin", text="User lives in Rome")
    ]


def test_braces_inside_strings_do_not_confuse_the_tolerant_parser():
    answer = 'x {"operations": [{"op": "ADD", "text": "User wrote {weird} text"}]} y'
    assert validate_operations(parse_json_answer(answer), []) == [
        Operation(op="ADD", text="User wrote {weird} text")
    ]


def test_prompt_templates_can_be_overridden_from_config():
    from memory.prompts import build_messages

    messages = build_messages(
        exchange("hello"),
        EXISTING,
        {
            "extraction_system": "SYS",
            "extraction_user": 'On $date: {"x": 1}\n$memories\n$conversation',
        },
    )
    assert messages[0] == {"role": "system", "content": "SYS"}
    assert messages[1]["content"].startswith('On 2026-03-13: {"x": 1}\n{"id": "0"')
