"""The two seams: before_forward may rewrite, after_completion sees only finished exchanges."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.recording import RecordingHooks
from tests.upstream import DONE, JSONReply, SSEReply, chunk

MESSAGES = [{"role": "user", "content": "I live in Lyon"}]


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks(response_headers={"X-Memory-Status": "hit=0"})


@pytest.fixture
def hooked(start_gateway, gateway_config, hooks):
    return start_gateway(gateway_config, hooks=hooks)


def _settle() -> None:
    # Give a wrongly scheduled after_completion the chance to show up.
    time.sleep(0.3)


def test_non_stream_completion_is_handed_on_exactly_once(hooked, hooks):
    with hooked.client() as sdk:
        sdk.chat.completions.create(model="m", messages=MESSAGES, user="u1")
    (exchange,) = hooks.wait_completed()
    _settle()
    assert len(hooks.completions) == 1
    assert exchange.reply_text == "echo: I live in Lyon"
    assert exchange.finish_reason == "stop"
    assert exchange.tool_calls is False
    assert exchange.request_body["messages"] == MESSAGES
    ctx = hooks.completions[0][0]
    assert ctx.stream is False
    assert ctx.identity.user_id == "u1"


def test_stream_completion_is_assembled_from_the_copy(hooked, hooks):
    with hooked.client() as sdk:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True, n=2)
            if c.choices and c.choices[0].index == 0
        )
    (exchange,) = hooks.wait_completed()
    _settle()
    assert len(hooks.completions) == 1
    assert exchange.reply_text == text == "echo: I live in Lyon"
    assert exchange.finish_reason == "stop"
    assert hooks.completions[0][0].stream is True


def test_tool_calls_are_flagged(hooked, hooks):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with hooked.client() as sdk:
        list(sdk.chat.completions.create(model="m", messages=MESSAGES, tools=tools, stream=True))
    (exchange,) = hooks.wait_completed()
    assert exchange.tool_calls is True
    assert exchange.finish_reason == "tool_calls"
    assert exchange.reply_text is None


def test_hook_response_headers_are_sent_on_streams_and_plain_answers(hooked):
    body = {"model": "m", "messages": MESSAGES}
    assert (
        httpx.post(hooked.base_url + "/chat/completions", json=body).headers["x-memory-status"]
        == "hit=0"
    )
    with httpx.stream(
        "POST", hooked.base_url + "/chat/completions", json={**body, "stream": True}
    ) as r:
        assert r.headers["x-memory-status"] == "hit=0"
        r.read()


def test_no_completion_for_upstream_errors(hooked, hooks, upstream):
    upstream.push(
        JSONReply({"error": {"message": "x", "type": "t", "param": None, "code": None}}, status=500)
    )
    upstream.push(
        JSONReply({"error": {"message": "x", "type": "t", "param": None, "code": None}}, status=429)
    )
    with hooked.client() as sdk:
        with pytest.raises(openai.InternalServerError):
            sdk.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            list(sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    _settle()
    assert hooks.completions == []
    assert len(hooks.contexts) == 2


def test_no_completion_for_truncated_streams(hooked, hooks, upstream):
    # Cut before [DONE]; and a stream that ends cleanly but without finish_reason or [DONE].
    upstream.push(
        SSEReply([chunk("a", role="assistant"), chunk(finish_reason="stop"), DONE], cut_after=2)
    )
    upstream.push(SSEReply([chunk("a", role="assistant"), chunk("b")]))
    upstream.push(SSEReply([chunk("a", role="assistant"), chunk(finish_reason="stop")]))
    for _ in range(3):
        httpx.post(
            hooked.base_url + "/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
        )
    _settle()
    assert hooks.completions == []


def test_a_stream_cut_short_by_the_server_is_not_recorded_and_is_logged_sparingly(
    hooked, hooks, upstream, caplog
):
    """[DONE] with no finish_reason: a one-slot server (llama-cpp-python) ended
    the answer to serve another request. The client gets what arrived; the
    exchange is not recorded; a WARNING at the 1st and 10th occurrence only."""
    caplog.set_level("WARNING", logger="gateway")
    for _ in range(12):
        upstream.push(SSEReply([chunk("a", role="assistant"), chunk("b"), DONE]))
        response = httpx.post(
            hooked.base_url + "/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
        )
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    _settle()
    assert hooks.completions == []
    cut = "without a finish reason"
    warnings = [r.getMessage() for r in caplog.records if cut in r.getMessage()]
    assert len(warnings) == 2
    assert "(1 so far)" in warnings[0] and "(10 so far)" in warnings[1]
    assert "--interrupt_requests False" in warnings[0]
    # Every one is counted for the operator (GET /metrics).
    metrics = httpx.get(hooked.url + "/metrics").text
    assert 'memory_gateway_streams_cut_total{upstream="scripted"} 12.0' in metrics


def test_no_completion_when_the_client_disconnects(hooked, hooks, upstream):
    gate = threading.Event()
    upstream.push(
        SSEReply([chunk("a", role="assistant"), chunk(finish_reason="stop"), DONE], gates={1: gate})
    )
    with hooked.client() as sdk:
        stream = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
    assert upstream.last().disconnected.wait(15)
    gate.set()
    _settle()
    assert hooks.completions == []


def test_a_failing_after_completion_hook_does_not_reach_the_client(hooked, hooks):
    hooks.fail_after = True
    with hooked.client() as sdk:
        first = sdk.chat.completions.create(model="m", messages=MESSAGES)
        hooks.wait_completed(1)
        second = sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert first.choices[0].message.content == second.choices[0].message.content
    hooks.wait_completed(2)


def test_ready_follows_the_hooks_and_health_does_not(hooked, hooks):
    assert httpx.get(hooked.url + "/health").json() == {"status": "ok"}
    assert httpx.get(hooked.url + "/ready").status_code == 200
    hooks.is_ready = False
    assert httpx.get(hooked.url + "/ready").status_code == 503
    assert httpx.get(hooked.url + "/health").status_code == 200


def test_lifespan_starts_and_stops_the_hooks(start_gateway, gateway_config):
    hooks = RecordingHooks()
    gw = start_gateway(gateway_config, hooks=hooks)
    assert hooks.started and not hooks.stopped
    gw.stop()
    assert hooks.stopped
