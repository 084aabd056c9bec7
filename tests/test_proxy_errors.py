"""Errors: the upstream's pass through unchanged; the gateway's own are OpenAI-shaped."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

from tests.gateway_server import gateway_config_for
from tests.upstream import DONE, HangReply, JSONReply, SSEReply, chunk

MESSAGES = [{"role": "user", "content": "hello"}]


def assert_openai_error(response: httpx.Response, status: int, *, code: str | None = None) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("status", [429, 500])
def test_upstream_errors_pass_through_unchanged(http, upstream, status):
    body = (
        b'{"error": {"message": "slow down", "type": "requests",'
        b' "param": null, "code": "rate_limit"}}'
    )
    upstream.push(
        JSONReply(body, status=status, headers={"retry-after": "3", "x-request-id": "req_e"})
    )
    response = http.post("/v1/chat/completions", json={"model": "test-model", "messages": MESSAGES})
    assert response.status_code == status
    assert response.content == body
    assert response.headers["retry-after"] == "3"
    assert response.headers["x-request-id"] == "req_e"


def test_upstream_error_on_a_stream_request_is_raised_by_the_sdk(client, upstream):
    upstream.push(
        JSONReply(
            {"error": {"message": "nope", "type": "server_error", "param": None, "code": None}},
            status=500,
        )
    )
    with pytest.raises(openai.InternalServerError, match="nope"):
        list(client.chat.completions.create(model="test-model", messages=MESSAGES, stream=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_upstream_is_502_naming_its_url(start_gateway, tmp_path):
    port = _free_port()
    config = gateway_config_for(f"http://127.0.0.1:{port}/v1?tenant=s3cret", tmp_path)
    gw = start_gateway(config)
    with gw.client() as sdk, pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(model="test-model", messages=MESSAGES)
    assert raised.value.status_code == 502
    assert raised.value.body["code"] == "upstream_unreachable"
    message = raised.value.body["message"]
    # Without its query string, where providers put keys (Azure's api-key=).
    assert f"http://127.0.0.1:{port}/v1" in message and "s3cret" not in message
    response = httpx.get(gw.url + "/v1/models")
    assert_openai_error(response, 502, code="upstream_unreachable")


def test_upstream_timeout_before_headers_is_504(start_gateway, upstream, tmp_path):
    config = gateway_config_for(upstream.url, tmp_path, http={"read_timeout": 0.5})
    gw = start_gateway(config)
    upstream.push(HangReply(seconds=20))
    response = httpx.post(
        gw.url + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=30
    )
    assert_openai_error(response, 504, code="upstream_timeout")


def test_invalid_json_is_400(http, upstream):
    response = http.post(
        "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_openai_error(response, 400, code="invalid_json")
    assert response.headers["x-should-retry"] == "false"
    assert upstream.requests == []


def test_body_that_is_not_an_object_is_400(http):
    error = assert_openai_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    assert "JSON object" in error["message"]


def test_messages_that_are_not_a_list_is_400_naming_the_param(http):
    error = assert_openai_error(
        http.post("/v1/chat/completions", json={"model": "m", "messages": "hi"}), 400
    )
    assert error["param"] == "messages"


def test_oversized_body_is_413(start_gateway, upstream, tmp_path):
    config = gateway_config_for(upstream.url, tmp_path, server={"max_body_bytes": 1000})
    gw = start_gateway(config)
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        assert_openai_error(
            http.post("/v1/chat/completions", json=big), 413, code="request_too_large"
        )

        def chunks():
            for _ in range(5):
                yield b"x" * 500

        # No Content-Length: the limit is enforced while reading.
        assert_openai_error(http.post("/v1/chat/completions", content=chunks()), 413)
        assert_openai_error(http.post("/v1/embeddings", json={"input": "y" * 2000}), 413)
        assert_openai_error(http.post("/v1/files", content=chunks()), 413)
        # Under the limit still works.
        assert (
            http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}).status_code
            == 200
        )
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions"]


def test_unknown_paths_and_methods_get_openai_shaped_errors(http):
    assert_openai_error(http.get("/nope"), 404, code="not_found")
    assert_openai_error(http.post("/health"), 405, code="method_not_allowed")


def test_a_stream_broken_midway_ends_with_an_error_event_and_no_done(http, client, upstream):
    events = [chunk("par", role="assistant"), chunk("tial"), chunk(finish_reason="stop"), DONE]
    upstream.push(SSEReply(events, cut_after=2))
    response = http.post(
        "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}
    )
    assert response.status_code == 200
    assert b"[DONE]" not in response.content
    last_event = response.content.strip().split(b"\n\n")[-1]
    assert last_event.startswith(b'data: {"error":')
    assert b"upstream_error" in last_event

    upstream.push(SSEReply(events, cut_after=2))
    received = []
    with pytest.raises(openai.APIError, match="broke"):
        for item in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.append(item.choices[0].delta.content)
    assert received == ["par", "tial"]


def test_a_cut_in_the_middle_of_an_event_still_ends_with_a_separate_error_event(http, upstream):
    upstream.push(
        SSEReply([chunk("ok", role="assistant"), b'data: {"id": "chatcmpl-x", "cho'], cut_after=2)
    )
    response = http.post(
        "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}
    )
    events = response.content.split(b"\n\n")
    assert events[1] == b'data: {"id": "chatcmpl-x", "cho'
    assert events[2].startswith(b'data: {"error":')


def test_an_upstream_that_stalls_mid_stream_is_ended_by_the_read_timeout(
    start_gateway, upstream, tmp_path
):
    import threading

    config = gateway_config_for(upstream.url, tmp_path, http={"read_timeout": 0.5})
    gw = start_gateway(config)
    never = threading.Event()
    upstream.push(
        SSEReply(
            [chunk("a", role="assistant"), chunk("b"), DONE], gates={1: never}, gate_timeout=20
        )
    )
    response = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "m", "messages": MESSAGES, "stream": True},
        timeout=30,
    )
    assert b"[DONE]" not in response.content
    assert b'"code":"upstream_timeout"' in response.content
