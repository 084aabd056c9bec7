"""Anthropic Messages with memory (gateway/apis/anthropic_messages.py): where
memories go in, what is recorded, and the whole loop through the real
anthropic SDK (`messages.create`, `.stream`, `count_tokens`) against an
`api: anthropic` upstream."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from gateway.apis.anthropic_messages import ANTHROPIC_MESSAGES, MessagesStream
from gateway.errors import GatewayError
from tests.extraction import is_extraction, latest_exchange, llm_answer
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.upstream import (
    JSONReply,
    Recorded,
    ScriptedUpstream,
    anthropic_message,
    anthropic_stream,
)

MEMORY = '```memories\n- [2026-01-01] "Lives in Oslo"\n```'
CACHED = {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}

# --- where memories go in -----------------------------------------------------


def test_memories_go_after_every_system_block_so_the_cached_prefix_survives() -> None:
    body = {"model": "c", "max_tokens": 9, "system": [CACHED], "messages": []}
    work = ANTHROPIC_MESSAGES.working_copy(body)
    ANTHROPIC_MESSAGES.inject(work, MEMORY, "before_last_user")
    assert work["system"] == [CACHED, {"type": "text", "text": MEMORY}]
    assert body["system"] == [CACHED]  # the client's body is untouched
    assert "cache_control" not in work["system"][-1]  # no fifth breakpoint

    work = ANTHROPIC_MESSAGES.working_copy({"system": "Be brief.", "messages": []})
    ANTHROPIC_MESSAGES.inject(work, MEMORY, "before_last_user")
    assert work["system"] == "Be brief.\n\n" + MEMORY
    work = ANTHROPIC_MESSAGES.working_copy({"messages": []})
    ANTHROPIC_MESSAGES.inject(work, MEMORY, "before_last_user")
    assert work["system"] == MEMORY


TOOL_LOOP = [
    {"role": "user", "content": [{"type": "text", "text": "Fix the bug in app.py"}]},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {}}],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "..."}]},
]


def test_the_query_is_what_the_user_said_not_a_tool_result() -> None:
    assert ANTHROPIC_MESSAGES.query({"messages": TOOL_LOOP}) == "Fix the bug in app.py"
    assert ANTHROPIC_MESSAGES.query({"messages": [{"role": "user", "content": "hi"}]}) == "hi"


def test_only_user_text_that_ends_the_conversation_is_recorded() -> None:
    assert ANTHROPIC_MESSAGES.new_turns({"messages": TOOL_LOOP}) == []
    started = {"messages": TOOL_LOOP[:1]}
    assert ANTHROPIC_MESSAGES.new_turns(started) == [
        {"role": "user", "content": "Fix the bug in app.py"}
    ]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    mixed = [{"role": "user", "content": [image, {"type": "text", "text": "This is my cat."}]}]
    assert [t["content"] for t in ANTHROPIC_MESSAGES.new_turns({"messages": mixed})] == [
        "This is my cat."
    ]


def test_a_body_that_is_not_a_messages_request_is_a_400() -> None:
    for body in ({"model": "c"}, {"messages": [], "system": 3}, {"messages": [], "metadata": []}):
        with pytest.raises(GatewayError) as raised:
            ANTHROPIC_MESSAGES.check(body)
        assert raised.value.status == 400


def test_an_answer_is_read_from_its_text_blocks_never_its_tool_use_or_thinking() -> None:
    message = anthropic_message("Done.", model="c")
    message["content"] = [
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "text", "text": "Done."},
        {"type": "tool_use", "id": "t", "name": "f", "input": {}},
    ]
    answer = ANTHROPIC_MESSAGES.parse(json.dumps(message).encode())
    assert answer is not None
    assert (answer.text, answer.finish_reason, answer.tool_calls) == ("Done.", "end_turn", True)
    assert ANTHROPIC_MESSAGES.parse(b'{"type": "error"}') is None


@pytest.mark.parametrize("split", [1, 5, 64, 10_000])
def test_a_stream_is_read_whatever_its_chunks_and_ends_at_message_stop(split: int) -> None:
    raw = b"".join(anthropic_stream(["It is ", "Oslo."], model="c"))  # type: ignore[arg-type]
    parser = MessagesStream()
    for i in range(0, len(raw), split):
        assert not parser.done
        parser.feed(raw[i : i + split])
    assert parser.done and not parser.error
    assert (parser.text, parser.finish_reason) == ("It is Oslo.", "end_turn")
    failed = MessagesStream()
    failed.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n')
    assert failed.done and failed.error


# --- the whole loop, through the anthropic SDK ------------------------------


def extractor(request: Recorded) -> JSONReply | None:
    if not is_extraction(request):
        return None
    ops = []
    if "Oslo" in latest_exchange(request):
        ops.append({"op": "ADD", "text": "Lives in Oslo"})
    return llm_answer(ops)


@pytest.fixture
def start_claude_gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> Callable[..., GatewayServer]:
    upstream.script(extractor)

    def start(*, anthropic_key: str | None = None, **sections: object) -> GatewayServer:
        upstreams = [
            {"name": "scripted", "base_url": upstream.url, "default": True},
            {
                "name": "claude",
                "base_url": upstream.url,
                "api": "anthropic",
                "models": ["claude-*"],
                "api_key": anthropic_key,
            },
        ]
        memory = {
            "spool": {"backoff_initial": 0.05, "backoff_max": 0.2},
            "search": {"min_score": -1},
            # The Anthropic key a request carries never goes to the (OpenAI)
            # extraction endpoint: extraction needs a key of its own.
            "llm": {"api_key": "sk-extraction"},
        }
        config = gateway_config_for(
            upstream.url, tmp_path / "data", memory=memory, upstreams=upstreams, **sections
        )
        return start_gateway(config)

    return start


def claude(
    gateway: GatewayServer, api_key: str = "sk-ant-client", **kw: object
) -> anthropic.Anthropic:
    client: Any = anthropic.Anthropic
    return client(base_url=gateway.url, api_key=api_key, max_retries=0, **kw)


def wait_for_memory(gateway: GatewayServer, user: str, text: str) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        while time.monotonic() < deadline:
            listed = http.get("/v1/memories", params={"user_id": user}).json()["data"]
            if any(m["text"] == text for m in listed):
                return
            time.sleep(0.05)
        jobs = http.get("/v1/memories/jobs", params={"user_id": user}).json()["data"]
    raise AssertionError(f"{text!r} never stored for {user}; jobs: {jobs}")


def app_requests(upstream: ScriptedUpstream) -> list[Recorded]:
    return [r for r in upstream.requests if r.path == "/v1/messages"]


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_a_fact_told_to_claude_is_remembered_and_injected_for_that_user_only(
    start_claude_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, stream: bool
) -> None:
    gateway = start_claude_gateway()
    alice = claude(gateway, default_headers={"X-User-Id": "alice"})
    said = [{"role": "user", "content": "I just moved to Oslo."}]
    if stream:
        with alice.messages.stream(model="claude-test", max_tokens=64, messages=said) as events:  # type: ignore[arg-type]
            final = events.get_final_message()
        assert final.content[0].text == "echo: I just moved to Oslo."  # type: ignore[union-attr]
    else:
        raw = alice.messages.with_raw_response.create(
            model="claude-test",
            max_tokens=64,
            messages=said,  # type: ignore[arg-type]
        )
        assert raw.headers["X-Memory-Status"] == "ok"
        assert raw.parse().content[0].text == "echo: I just moved to Oslo."  # type: ignore[union-attr]
    wait_for_memory(gateway, "alice", "Lives in Oslo")

    ask = [{"role": "user", "content": "Where do I live?"}]
    later = alice.messages.with_raw_response.create(
        model="claude-test",
        max_tokens=64,
        system=[CACHED],
        messages=ask,  # type: ignore[arg-type,list-item]
    )
    assert later.headers["X-Memory-Injected"] == "1"
    sent = app_requests(upstream)[-1].json
    assert sent["system"][0] == CACHED and "Lives in Oslo" in sent["system"][1]["text"]
    assert sent["messages"] == ask

    bob = claude(gateway, default_headers={"X-User-Id": "bob"})
    bob.messages.create(model="claude-test", max_tokens=64, messages=ask)  # type: ignore[arg-type]
    assert "Lives in Oslo" not in json.dumps(app_requests(upstream)[-1].json)


def test_anthropic_headers_and_the_stream_pass_untouched(
    start_claude_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream
) -> None:
    gateway = start_claude_gateway()
    body = {
        "model": "claude-test",
        "max_tokens": 9,
        "stream": True,
        "messages": [{"role": "user", "content": "hello"}],
    }
    headers = {
        "x-api-key": "sk-ant-client",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "prompt-caching-2024-07-31",
    }
    with httpx.Client(timeout=30) as http:
        direct = http.post(upstream.url + "/messages", json=body, headers=headers).content
        via = http.post(
            gateway.url + "/v1/messages", json=body, headers={**headers, "X-User-Id": "carol"}
        )
    assert via.content == direct
    sent = upstream.requests[-1]
    assert sent.path == "/v1/messages"
    for name, value in headers.items():
        assert sent.headers[name] == value


def test_a_configured_key_and_a_gateway_key_never_let_the_clients_key_through(
    start_claude_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream
) -> None:
    gateway = start_claude_gateway(
        anthropic_key="sk-ant-gateway",
        auth={"keys": [{"key": "gk-alice", "user_id": "alice"}]},
    )
    # Claude Code sends its ANTHROPIC_API_KEY as x-api-key: a gateway key names the user.
    raw = claude(gateway, api_key="gk-alice").messages.with_raw_response.create(
        model="claude-test", max_tokens=9, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["X-Memory-Status"] == "ok"
    sent = app_requests(upstream)[-1]
    assert sent.headers["x-api-key"] == "sk-ant-gateway"
    assert "gk-alice" not in json.dumps(sent.headers)


def test_count_tokens_goes_to_the_anthropic_upstream(
    start_claude_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream
) -> None:
    gateway = start_claude_gateway()
    counted = claude(gateway).messages.count_tokens(
        model="claude-test", messages=[{"role": "user", "content": "hello there"}]
    )
    assert counted.input_tokens > 0
    assert upstream.requests[-1].path == "/v1/messages/count_tokens"


def test_bad_input_gets_anthropics_error_shape(
    start_claude_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = start_claude_gateway()
    with httpx.Client(timeout=30) as http:
        response = http.post(gateway.url + "/v1/messages", json={"model": "claude-test"})
        not_json = http.post(gateway.url + "/v1/messages", content=b"{oops")
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in response.json()["error"]["message"]
    assert not_json.status_code == 400 and not_json.json()["type"] == "error"
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude(gateway).messages.create(model="claude-test", max_tokens=9, messages="hi")  # type: ignore[arg-type]
    assert "messages" in str(raised.value)


def test_without_an_anthropic_upstream_messages_is_a_clear_404(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(gateway_config_for(upstream.url, tmp_path / "data"))
    with httpx.Client(timeout=30) as http:
        response = http.post(
            gateway.url + "/v1/messages",
            json={"model": "claude-test", "max_tokens": 9, "messages": []},
        )
    assert response.status_code == 404
    assert "api: anthropic" in response.json()["error"]["message"]


def test_a_coding_agent_route_can_record_only_what_the_user_typed(
    start_claude_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream
) -> None:
    """`memory.record_by_path`, or a request's `X-Memory-Record: user`: the
    reply (about the agent's work) never reaches extraction."""
    gateway = start_claude_gateway()
    alice = claude(gateway, default_headers={"X-User-Id": "alice", "X-Memory-Record": "user"})
    alice.messages.create(
        model="claude-test", max_tokens=9, messages=[{"role": "user", "content": "I live in Oslo."}]
    )
    wait_for_memory(gateway, "alice", "Lives in Oslo")
    shown = [latest_exchange(r) for r in upstream.requests if is_extraction(r)][-1]
    assert "I live in Oslo." in shown and "echo:" not in shown

    bad = claude(gateway, default_headers={"X-User-Id": "alice", "X-Memory-Record": "all"})
    with pytest.raises(anthropic.BadRequestError) as raised:
        bad.messages.create(
            model="claude-test", max_tokens=9, messages=[{"role": "user", "content": "x"}]
        )
    assert "X-Memory-Record" in str(raised.value)


def test_a_fact_told_through_one_api_is_injected_through_every_other_for_that_user_only(
    start_claude_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream
) -> None:
    """Told through Responses; recalled in Messages and in Chat Completions."""
    gateway = start_claude_gateway()
    openai_client = gateway.client()
    openai_client.responses.create(
        model="test-model", input="I just moved to Oslo.", extra_headers={"X-User-Id": "alice"}
    )
    wait_for_memory(gateway, "alice", "Lives in Oslo")
    ask = [{"role": "user", "content": "Where do I live?"}]
    for user in ("alice", "bob"):
        claude(gateway, default_headers={"X-User-Id": user}).messages.create(
            model="claude-test", max_tokens=9, messages=ask
        )
        openai_client.chat.completions.create(
            model="test-model", messages=ask, extra_headers={"X-User-Id": user}
        )
        to_claude, to_chat = (
            [r for r in upstream.requests if r.path == path and not is_extraction(r)][
                -1
            ].body.decode()
            for path in ("/v1/messages", "/v1/chat/completions")
        )
        told = user == "alice"
        assert ("Lives in Oslo" in to_claude) is told
        assert ("Lives in Oslo" in to_chat) is told
