"""A client that hangs up mid-stream cancels the upstream request (no leaked connection)."""

from __future__ import annotations

import threading

import httpx

from tests.upstream import DONE, SSEReply, chunk

MESSAGES = [{"role": "user", "content": "tell me a long story"}]


def _long_story(gate: threading.Event) -> SSEReply:
    events = [
        chunk("once", role="assistant"),
        chunk(" upon"),
        chunk(" a time"),
        chunk(finish_reason="stop"),
        DONE,
    ]
    # The upstream keeps the stream open after two chunks until told otherwise.
    return SSEReply(events, gates={2: gate}, gate_timeout=30)


def test_client_disconnect_mid_stream_closes_the_upstream_connection(gateway, upstream):
    never = threading.Event()
    upstream.push(_long_story(never))
    with gateway.client() as sdk:
        stream = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        first = next(iter(stream))
        assert first.choices[0].delta.content == "once"
        stream.close()
    recorded = upstream.last()
    assert recorded.disconnected.wait(timeout=15), "the gateway kept the upstream request open"
    assert not recorded.finished.is_set()


def test_raw_socket_disconnect_while_the_gateway_waits_for_the_upstream(gateway, upstream):
    never = threading.Event()
    upstream.push(_long_story(never))
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
        ) as response,
    ):
        iterator = response.iter_raw()
        assert b"once" in next(iterator)
        # Leaving the block closes the connection while the gateway is parked on the upstream.
    assert upstream.last().disconnected.wait(timeout=15)


def test_gateway_keeps_serving_after_disconnects(gateway, upstream, client):
    for _ in range(3):
        upstream.push(_long_story(threading.Event()))
        with gateway.client() as sdk:
            stream = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            next(iter(stream))
            stream.close()
        assert upstream.last().disconnected.wait(timeout=15)
    result = client.chat.completions.create(model="m", messages=MESSAGES)
    assert result.choices[0].message.content == "echo: tell me a long story"
