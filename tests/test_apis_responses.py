"""The OpenAI Responses API with memory (gateway/apis/responses.py): where
memories go in for stateful and stateless calls, what is recorded, and the
whole loop through the real openai SDK (`responses.create`, `.stream`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from gateway.apis.responses import RESPONSES, ResponsesStream
from tests.extraction import is_extraction, latest_exchange, llm_answer
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.upstream import JSONReply, Recorded, ScriptedUpstream, response_object, responses_stream

MEMORY = '```memories\n- [2026-01-01] "Lives in Oslo"\n```'

# --- where memories go in -----------------------------------------------------


def test_a_stateful_call_gets_memories_in_its_instructions_never_in_its_input() -> None:
    """The input would be stored with the conversation and repeated every turn."""
    body = {"model": "m", "input": "Where do I live?", "previous_response_id": "resp_1"}
    work = RESPONSES.working_copy(body)
    RESPONSES.inject(work, MEMORY, "before_last_user")
    assert work["input"] == "Where do I live?"
    assert work["instructions"] == MEMORY
    with_instructions = {**body, "conversation": "conv_1", "instructions": "Be brief."}
    work = RESPONSES.working_copy(with_instructions)
    RESPONSES.inject(work, MEMORY, "before_last_user")
    assert work["instructions"] == "Be brief.\n\n" + MEMORY
    assert with_instructions["instructions"] == "Be brief."  # the client's body is untouched


def test_a_stateless_call_gets_one_developer_item_before_its_last_user_item() -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hm?"}]},
    ]
    body = {"model": "m", "input": history, "instructions": "Be brief."}
    work = RESPONSES.working_copy(body)
    RESPONSES.inject(work, MEMORY, "before_last_user")
    assert work["input"] == [*history[:2], {"role": "developer", "content": MEMORY}, history[2]]
    assert work["instructions"] == "Be brief."  # the cached prefix stays as it was
    assert body["input"] == history

    work = RESPONSES.working_copy({"model": "m", "input": "Where do I live?"})
    RESPONSES.inject(work, MEMORY, "before_last_user")
    assert work["input"] == [
        {"role": "developer", "content": MEMORY},
        {"role": "user", "content": "Where do I live?"},
    ]


def test_the_search_query_is_the_newest_user_input() -> None:
    assert RESPONSES.query({"input": "plain text"}) == "plain text"
    items = [
        {"role": "user", "content": "old"},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "new"}, {"type": "input_image"}],
        },
        {"type": "function_call_output", "call_id": "c", "output": "42"},
    ]
    assert RESPONSES.query({"input": items}) == "new"
    assert RESPONSES.query({"previous_response_id": "r"}) == ""


def test_only_the_user_items_that_end_the_input_are_recorded() -> None:
    assert RESPONSES.new_turns({"input": "I moved to Oslo."}) == [
        {"role": "user", "content": "I moved to Oslo."}
    ]
    history = [
        {"role": "user", "content": "told before"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "first new"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second"}]},
    ]
    assert [t["content"] for t in RESPONSES.new_turns({"input": history})] == [
        "first new",
        "second",
    ]
    tool_loop = [*history, {"type": "function_call_output", "call_id": "c", "output": "{}"}]
    assert RESPONSES.new_turns({"input": tool_loop}) == []


def test_a_body_that_is_not_a_responses_request_is_a_400() -> None:
    from gateway.errors import GatewayError

    for body in ({"input": 42}, {"input": "x", "instructions": ["no"]}):
        with pytest.raises(GatewayError) as raised:
            RESPONSES.check(body)
        assert raised.value.status == 400


# --- reading the answer ------------------------------------------------------


def test_a_whole_response_is_read_from_its_output_messages() -> None:
    completed = json.dumps(response_object("It is Oslo.", model="m")).encode()
    answer = RESPONSES.parse(completed)
    assert answer is not None
    assert (answer.text, answer.finish_reason, answer.tool_calls) == ("It is Oslo.", "stop", False)
    incomplete = response_object("It is", model="m", status="incomplete")
    assert RESPONSES.parse(json.dumps(incomplete).encode()).finish_reason == "length"  # type: ignore[union-attr]
    call = {**response_object("", model="m"), "output": [{"type": "function_call", "name": "f"}]}
    answer = RESPONSES.parse(json.dumps(call).encode())
    assert answer is not None and answer.tool_calls and answer.text is None
    assert RESPONSES.parse(b"not json") is None


@pytest.mark.parametrize("split", [1, 7, 64, 10_000])
def test_a_stream_is_read_whatever_its_chunks_and_ends_at_its_terminal_event(split: int) -> None:
    raw = b"".join(responses_stream(["It is ", "Oslo."], model="m"))  # type: ignore[arg-type]
    parser = ResponsesStream()
    for i in range(0, len(raw), split):
        assert not parser.done
        parser.feed(raw[i : i + split])
    assert parser.done and not parser.error
    assert (parser.text, parser.finish_reason) == ("It is Oslo.", "stop")


def test_a_failed_or_unfinished_stream_is_not_an_answer() -> None:
    failed = ResponsesStream()
    failed.feed(b'event: response.failed\ndata: {"type":"response.failed","response":{}}\n\n')
    assert failed.done and failed.error
    cut = ResponsesStream()
    cut.feed(b"".join(responses_stream(["a", "b"], model="m")[:-1]))  # type: ignore[arg-type]
    cut.close()
    assert not cut.done


# --- the whole loop, through the openai SDK ---------------------------------


def extractor(request: Recorded) -> JSONReply | None:
    if not is_extraction(request):
        return None
    ops = []
    if "Oslo" in latest_exchange(request):
        ops.append({"op": "ADD", "text": "Lives in Oslo"})
    return llm_answer(ops)


@pytest.fixture
def memory_gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> GatewayServer:
    upstream.script(extractor)
    memory = {"spool": {"backoff_initial": 0.05, "backoff_max": 0.2}, "search": {"min_score": -1}}
    return start_gateway(gateway_config_for(upstream.url, tmp_path / "data", memory=memory))


def wait_for_memory(gateway: GatewayServer, user: str, text: str) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        while time.monotonic() < deadline:
            listed = http.get("/v1/memories", params={"user_id": user}).json()["data"]
            if any(m["text"] == text for m in listed):
                return
            time.sleep(0.05)
    raise AssertionError(f"{text!r} never stored for {user}")


def app_requests(upstream: ScriptedUpstream) -> list[Recorded]:
    return [r for r in upstream.requests if r.path.endswith("/responses")]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_a_fact_told_through_responses_is_remembered_and_injected_for_that_user_only(
    memory_gateway: GatewayServer, upstream: ScriptedUpstream, stream: bool
) -> None:
    client = memory_gateway.client()
    alice = {"X-User-Id": "alice"}
    if stream:
        with client.responses.stream(
            model="m", input="I just moved to Oslo.", extra_headers=alice
        ) as events:
            final = events.get_final_response()
        assert final.output_text == "echo: I just moved to Oslo."
    else:
        raw = client.responses.with_raw_response.create(
            model="m", input="I just moved to Oslo.", extra_headers=alice
        )
        assert raw.headers["X-Memory-Status"] == "ok"
        assert raw.parse().output_text == "echo: I just moved to Oslo."
    wait_for_memory(memory_gateway, "alice", "Lives in Oslo")

    later = client.responses.with_raw_response.create(
        model="m",
        input="Where do I live?",
        previous_response_id="resp_earlier",
        extra_headers=alice,
    )
    assert later.headers["X-Memory-Injected"] == "1"
    sent = app_requests(upstream)[-1].json
    assert "Lives in Oslo" in sent["instructions"] and sent["input"] == "Where do I live?"

    client.responses.create(model="m", input="Where do I live?", user="bob")
    assert "Lives in Oslo" not in json.dumps(app_requests(upstream)[-1].json)


def test_the_stream_reaches_the_client_byte_for_byte(
    memory_gateway: GatewayServer, upstream: ScriptedUpstream
) -> None:
    body = {"model": "m", "input": "hello", "stream": True}
    with httpx.Client(timeout=30) as http:
        direct = http.post(upstream.url + "/responses", json=body).content
        via = http.post(
            memory_gateway.base_url + "/responses", json=body, headers={"X-User-Id": "carol"}
        )
    assert via.content == direct
    assert via.headers["X-Memory-Status"] == "ok"


def test_safety_identifier_names_the_user_and_a_bad_body_is_an_openai_400(
    memory_gateway: GatewayServer, upstream: ScriptedUpstream
) -> None:
    client = memory_gateway.client()
    raw = client.responses.with_raw_response.create(
        model="m", input="I just moved to Oslo.", safety_identifier="dave"
    )
    assert raw.headers["X-Memory-Status"] == "ok"
    wait_for_memory(memory_gateway, "dave", "Lives in Oslo")
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="m", input=42)  # type: ignore[arg-type]
    assert raised.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input="x", safety_identifier=7)  # type: ignore[arg-type]


def test_other_responses_paths_pass_through(
    memory_gateway: GatewayServer, upstream: ScriptedUpstream
) -> None:
    upstream.push(JSONReply(response_object("stored", model="m")), path="/v1/responses/resp_1")
    with httpx.Client(timeout=30) as http:
        got = http.get(memory_gateway.base_url + "/responses/resp_1")
    assert got.status_code == 200 and got.json()["id"] == "resp_scripted"
    assert upstream.requests[-1].method == "GET"
