"""Upstream faults with memory on: the client gets a prompt, correct answer; nothing
partial is remembered; the gateway stays healthy. Status codes and stream shapes
alone are covered in test_proxy_errors.py; here the memory side is asserted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.extraction import is_extraction, wait_for
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import (
    free_port,
    memory_settings,
    new_token,
    token_extractor,
)
from tests.upstream import (
    HangReply,
    JSONReply,
    Recorded,
    ScriptedUpstream,
    SSEReply,
    chunk,
    text_stream,
)

USER = {"X-User-Id": "fault-user"}


@pytest.fixture
def gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> GatewayServer:
    upstream.script(token_extractor)
    config = gateway_config_for(
        upstream.url,
        tmp_path / "data",
        memory=memory_settings(upstream.url),
        # Models named dead-* go to a port nobody listens on.
        upstreams=[
            {"name": "scripted", "base_url": upstream.url, "default": True},
            {
                "name": "dead",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "models": ["dead-*"],
            },
        ],
        http={"read_timeout": 0.5},
    )
    return start_gateway(config)


@pytest.fixture
def http(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


def _chat(http: httpx.Client, token: str, *, stream: bool, model: str = "m") -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "stream": stream,
            "messages": [{"role": "user", "content": f"remember {token}"}],
        },
        headers=USER,
    )


def _nothing_recorded(http: httpx.Client, upstream: ScriptedUpstream) -> None:
    # A successful exchange afterwards goes through the same spool: once its fact
    # is stored, anything the faulty one had queued would have been processed too.
    healthy = new_token()
    assert _chat(http, healthy, stream=False).status_code == 200
    wait_for(lambda: http.get("/v1/memories", params={"user_id": "fault-user"}).json()["data"])
    stats = http.get("/v1/memories/stats").json()
    wait_for(lambda: http.get("/v1/memories/stats").json()["spool"]["pending"] == 0)
    texts = [
        m["text"] for m in http.get("/v1/memories", params={"user_id": "fault-user"}).json()["data"]
    ]
    assert texts == [f"Remembers {healthy}"], texts
    assert stats["spool"]["failed"] == 0
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200


def _is_openai_error(response: httpx.Response) -> bool:
    body = response.json()
    return set(body["error"]) >= {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_refused_connection_is_a_502_and_nothing_is_remembered(
    http: httpx.Client, upstream: ScriptedUpstream, stream: bool
) -> None:
    response = _chat(http, new_token(), stream=stream, model="dead-model")
    assert response.status_code == 502 and _is_openai_error(response)
    _nothing_recorded(http, upstream)


def test_timeout_before_headers_is_a_504_and_nothing_is_remembered(
    http: httpx.Client, upstream: ScriptedUpstream
) -> None:
    upstream.push(HangReply(seconds=5))
    started = time.monotonic()
    response = _chat(http, new_token(), stream=True)
    assert response.status_code == 504 and _is_openai_error(response)
    assert time.monotonic() - started < 5, "the read timeout, not the upstream, ended it"
    _nothing_recorded(http, upstream)


def test_a_stall_between_chunks_ends_with_an_error_event_and_nothing_is_remembered(
    http: httpx.Client, upstream: ScriptedUpstream
) -> None:
    never = threading.Event()
    upstream.push(SSEReply(text_stream(["half", "an", "answer"]), gates={3: never}, gate_timeout=5))
    response = _chat(http, new_token(), stream=True)
    assert response.status_code == 200
    assert '"upstream_timeout"' in response.text and "[DONE]" not in response.text
    _nothing_recorded(http, upstream)


@pytest.mark.parametrize("status", [500, 503, 429])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_error_statuses_pass_through_and_nothing_is_remembered(
    http: httpx.Client, upstream: ScriptedUpstream, status: int, stream: bool
) -> None:
    error = {"error": {"message": "busy", "type": "server_error", "param": None, "code": None}}
    upstream.push(JSONReply(error, status=status, headers={"retry-after": "1"}))
    response = _chat(http, new_token(), stream=stream)
    assert response.status_code == status
    assert response.json() == error
    assert response.headers.get("retry-after") == "1"
    _nothing_recorded(http, upstream)


def test_a_200_with_a_body_that_is_not_json_is_relayed_and_not_remembered(
    http: httpx.Client, upstream: ScriptedUpstream
) -> None:
    upstream.push(JSONReply(b"<html>proxy error</html>", content_type="text/html"))
    response = _chat(http, new_token(), stream=False)
    assert response.status_code == 200 and response.content == b"<html>proxy error</html>"
    _nothing_recorded(http, upstream)


def test_malformed_sse_is_relayed_verbatim_and_not_remembered(
    http: httpx.Client, upstream: ScriptedUpstream
) -> None:
    events: list[bytes | dict[str, Any]] = [
        chunk("", role="assistant"),
        b"data: {not json at all\n\n",
        b"event: weird\nid: 7\n\n",
        b"data: [DONE]\n\n",
    ]
    upstream.push(SSEReply(events))
    response = _chat(http, new_token(), stream=True)
    assert response.status_code == 200
    assert b"data: {not json at all\n\n" in response.content
    _nothing_recorded(http, upstream)


def test_a_stream_cut_midway_is_not_remembered(
    http: httpx.Client, upstream: ScriptedUpstream
) -> None:
    upstream.push(SSEReply(text_stream(["cut", "here", "please"]), cut_after=3))
    response = _chat(http, new_token(), stream=True)
    assert '"error"' in response.text and "[DONE]" not in response.text
    _nothing_recorded(http, upstream)


def test_a_stream_ending_without_done_is_not_remembered(
    http: httpx.Client, upstream: ScriptedUpstream
) -> None:
    upstream.push(SSEReply([chunk("", role="assistant"), chunk("partial")]))
    response = _chat(http, new_token(), stream=True)
    assert response.status_code == 200 and "[DONE]" not in response.text
    _nothing_recorded(http, upstream)


def test_extraction_llm_outage_jobs_wait_and_drain_when_it_returns(
    http: httpx.Client, upstream: ScriptedUpstream
) -> None:
    down = threading.Event()
    down.set()
    calls: list[Recorded] = []

    def outage(request: Recorded) -> JSONReply | None:
        if not is_extraction(request) or not down.is_set():
            return None
        calls.append(request)
        return JSONReply({"error": {"message": "down", "type": "server_error"}}, status=503)

    upstream.reset()
    upstream.script(outage)
    upstream.script(token_extractor)
    tokens = [new_token() for _ in range(3)]
    for token in tokens:
        # Chat keeps working while extraction is down.
        assert _chat(http, token, stream=False).status_code == 200
    # Far more failed calls than spool.max_attempts (5): an outage waits, it never parks.
    wait_for(lambda: len(calls) >= 12)
    assert http.get("/v1/memories", params={"user_id": "fault-user"}).json()["data"] == []
    assert http.get("/v1/memories/stats").json()["spool"]["failed"] == 0
    down.clear()
    wait_for(lambda: http.get("/v1/memories/stats").json()["spool"]["pending"] == 0)
    texts = {
        m["text"] for m in http.get("/v1/memories", params={"user_id": "fault-user"}).json()["data"]
    }
    wait_for(
        lambda: (
            {
                m["text"]
                for m in http.get("/v1/memories", params={"user_id": "fault-user"}).json()["data"]
            }
            == {f"Remembers {t}" for t in tokens}
        )
    )
    assert texts <= {f"Remembers {t}" for t in tokens}


def test_an_embedder_down_at_start_up_serves_chat_without_memory_until_it_returns(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """No crash loop: the gateway starts, answers without memory, and opens the
    memory engine by itself once the embeddings endpoint answers."""
    down = threading.Event()
    down.set()

    def embeddings_outage(request: Recorded) -> JSONReply | None:
        if request.path.endswith("/embeddings") and down.is_set():
            return JSONReply({"error": {"message": "loading", "type": "server_error"}}, 503)
        return None

    upstream.script(embeddings_outage)
    upstream.script(token_extractor)
    config = gateway_config_for(
        upstream.url, tmp_path / "data", memory=memory_settings(upstream.url)
    )
    gateway = start_gateway(config)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        response = _chat(http, new_token(), stream=False)
        assert response.status_code == 200
        assert response.headers["x-memory-status"] == "unavailable"
        streamed = _chat(http, new_token(), stream=True)
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 503
        listing = http.get("/v1/memories", params={"user_id": "fault-user"})
        assert listing.status_code == 503
        assert listing.json()["error"]["code"] == "memory_unavailable"

        down.clear()
        wait_for(lambda: http.get("/ready").status_code == 200, timeout=60)
        token = new_token()
        response = _chat(http, token, stream=False)
        assert response.headers["x-memory-status"] == "ok"
        wait_for(
            lambda: (
                [
                    m["text"]
                    for m in http.get("/v1/memories", params={"user_id": "fault-user"}).json()[
                        "data"
                    ]
                ]
                == [f"Remembers {token}"]
            )
        )
