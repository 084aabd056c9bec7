"""Chat completions through the gateway are indistinguishable from the upstream's."""

from __future__ import annotations

import threading

import httpx
import msgspec

from tests.recording import RecordingHooks
from tests.upstream import DONE, JSONReply, SSEReply, chunk

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what is the capital of France"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look something up",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


def test_non_stream_result_is_identical_to_the_upstream(client, direct_client):
    via_gateway = client.chat.completions.create(model="test-model", messages=MESSAGES)
    direct = direct_client.chat.completions.create(model="test-model", messages=MESSAGES)
    assert via_gateway.model_dump() == direct.model_dump()
    assert via_gateway.choices[0].message.content == "echo: what is the capital of France"


def test_stream_is_identical_chunk_by_chunk(client, direct_client):
    via_gateway = list(
        client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
    )
    direct = list(
        direct_client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
    )
    assert [c.model_dump() for c in via_gateway] == [c.model_dump() for c in direct]
    text = "".join(c.choices[0].delta.content or "" for c in via_gateway)
    assert text == "echo: what is the capital of France"


def test_stream_bytes_and_content_type_pass_through_unchanged(http, upstream):
    body = {"model": "test-model", "messages": MESSAGES, "stream": True}
    with httpx.Client(timeout=30) as direct:
        expected = direct.post(upstream.url + "/chat/completions", json=body).content
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.content == expected
    assert response.content.endswith(DONE)


def test_tool_calls(client, direct_client):
    kwargs = dict(model="test-model", messages=MESSAGES, tools=TOOLS, tool_choice="auto")
    result = client.chat.completions.create(**kwargs)
    assert result.model_dump() == direct_client.chat.completions.create(**kwargs).model_dump()
    assert result.choices[0].finish_reason == "tool_calls"
    assert result.choices[0].message.tool_calls[0].function.name == "lookup"

    streamed = list(client.chat.completions.create(stream=True, **kwargs))
    direct = list(direct_client.chat.completions.create(stream=True, **kwargs))
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in direct]
    calls = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "lookup"


def test_n_equals_two(client, direct_client):
    result = client.chat.completions.create(model="test-model", messages=MESSAGES, n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert (
        result.model_dump()
        == direct_client.chat.completions.create(
            model="test-model", messages=MESSAGES, n=2
        ).model_dump()
    )

    streamed = list(
        client.chat.completions.create(model="test-model", messages=MESSAGES, n=2, stream=True)
    )
    texts = {0: "", 1: ""}
    for c in streamed:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {
        0: "echo: what is the capital of France",
        1: "echo: what is the capital of France #1",
    }


def test_stream_options_include_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="test-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens > 0


def test_every_request_field_reaches_the_upstream_untouched(client, upstream):
    client.chat.completions.create(
        model="test-model",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        response_format={"type": "json_object"},
        logprobs=True,
        top_logprobs=2,
        temperature=0.3,
        seed=7,
        extra_body={"vendor_field": {"nested": [1, 2]}, "top_k": 40},
    )
    sent = upstream.last("/v1/chat/completions")
    assert sent.json["vendor_field"] == {"nested": [1, 2]}
    assert sent.json["top_k"] == 40
    assert sent.json["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert sent.json["response_format"] == {"type": "json_object"}
    assert sent.json["logprobs"] is True and sent.json["top_logprobs"] == 2


def test_the_clients_bytes_are_forwarded_verbatim(http, upstream):
    # Unusual spacing and key order: any re-encoding would change these bytes.
    raw = (
        b'{ "messages" : [ {"role":"user","content":"caf\\u00e9"} ],'
        b'  "model":"test-model", "z": 1.50 }'
    )
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    assert upstream.last().body == raw


def test_useful_headers_kept_and_hop_by_hop_dropped(http, upstream):
    reply = SSEReply(
        [chunk("hi", role="assistant"), chunk(finish_reason="stop"), DONE],
        headers={
            "x-request-id": "req_123",
            "openai-processing-ms": "42",
            "x-ratelimit-remaining-tokens": "999",
            "keep-alive": "timeout=5",
            "x-custom": "kept",
        },
    )
    upstream.push(reply)
    response = http.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": MESSAGES, "stream": True},
        headers={"x-trace": "abc", "connection": "keep-alive, x-private", "x-private": "secret"},
    )
    assert response.headers["x-request-id"] == "req_123"
    assert response.headers["openai-processing-ms"] == "42"
    assert response.headers["x-ratelimit-remaining-tokens"] == "999"
    assert response.headers["x-custom"] == "kept"
    assert "keep-alive" not in response.headers
    sent = upstream.last().headers
    assert sent["x-trace"] == "abc"
    assert "x-private" not in sent
    assert sent["host"] == upstream.url.split("//")[1].split("/")[0]


def test_each_event_reaches_the_client_before_the_upstream_sends_the_next(gateway, upstream):
    # The upstream holds every chunk after the first until the test has seen the
    # previous one: a gateway that buffered would never deliver anything.
    gates = {i: threading.Event() for i in range(1, 5)}
    events = [
        chunk("a", role="assistant"),
        chunk("b"),
        chunk("c"),
        chunk("d"),
        chunk(finish_reason="stop"),
        DONE,
    ]
    upstream.push(SSEReply(events, gates=gates, gate_timeout=20))
    received = []
    with gateway.client() as sdk:
        stream = sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
        for item in stream:
            received.append(item)
            n = len(received)
            if n < 5:
                # Nothing after chunk n-1 has been sent yet.
                assert upstream.last().sent == list(range(n))
                gates[n].set()
    assert "".join(c.choices[0].delta.content or "" for c in received) == "abcd"


def test_slow_upstream_chunks_are_not_batched(gateway, upstream):
    # 5 chunks 300 ms apart; the first must arrive while the upstream still holds the rest.
    events = [chunk(w, role="assistant" if i == 0 else None) for i, w in enumerate("vwxyz")]
    upstream.push(SSEReply([*events, chunk(finish_reason="stop"), DONE], delay=0.3))
    with gateway.client() as sdk:
        stream = sdk.chat.completions.create(model="test-model", messages=MESSAGES, stream=True)
        first = next(iter(stream))
        sent_when_first_arrived = list(upstream.last().sent)
        rest = list(stream)
    assert first.choices[0].delta.content == "v"
    # Strict ordering is proven with gates above; here, only that nothing waited
    # for the whole answer (which takes 1.2 s upstream).
    assert len(sent_when_first_arrived) < 5
    assert [c.choices[0].delta.content for c in rest] == ["w", "x", "y", "z", None]


def test_before_forward_rewrite_reaches_the_upstream(start_gateway, gateway_config, upstream):
    def add_memory(messages):
        return [{"role": "system", "content": "User lives in Paris."}, *messages]

    hooks = RecordingHooks(rewrite=add_memory)
    gw = start_gateway(gateway_config, hooks=hooks)
    with gw.client() as sdk:
        sdk.chat.completions.create(
            model="test-model", messages=MESSAGES, extra_body={"vendor_field": 1}
        )
    sent = msgspec.json.decode(upstream.last().body)
    assert sent["messages"][0] == {"role": "system", "content": "User lives in Paris."}
    assert sent["messages"][1:] == MESSAGES
    assert sent["vendor_field"] == 1
    # The exchange handed on afterwards holds what the client sent, not the rewrite.
    (exchange,) = hooks.wait_completed()
    assert exchange.request_body["messages"] == MESSAGES


def test_cookies_an_upstream_sets_reach_that_client_and_never_another_request(http, upstream):
    """The upstream client is shared by every user: a cookie jar in it would
    carry one user's cookies (a load balancer's session, say) to everyone."""
    upstream.push(
        JSONReply(
            {"choices": []},
            headers={"set-cookie": "session=user-a-secret; Path=/; HttpOnly"},
        )
    )
    first = http.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": MESSAGES},
        headers={"X-User-Id": "user-a"},
    )
    assert "session=user-a-secret" in first.headers["set-cookie"]
    http.cookies.clear()
    http.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": MESSAGES},
        headers={"X-User-Id": "user-b"},
    )
    assert "cookie" not in upstream.last().headers


def test_a_clients_own_cookie_header_reaches_the_upstream_as_sent(http, upstream):
    upstream.push(JSONReply({"choices": []}, headers={"set-cookie": "lb=node-7; Path=/"}))
    http.post("/v1/chat/completions", json={"model": "test-model", "messages": MESSAGES})
    http.cookies.clear()
    http.post(
        "/v1/chat/completions",
        json={"model": "test-model", "messages": MESSAGES},
        headers={"cookie": "mine=1"},
    )
    assert upstream.last().headers["cookie"] == "mine=1"
