"""Every request as operators see it (gateway/observe.py): counted whatever
answered it, each chat kept in the recent list with what memory did, and at
debug level one log line per chat with memory ids, never memory text."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.recent_requests import RecentRequests
from tests.extraction import is_extraction, latest_exchange, llm_answer, wait_for
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import memory_settings, spool_drained
from tests.test_metrics import value
from tests.upstream import JSONReply, Recorded, ScriptedUpstream

FACT = "Plays the theremin on Sundays"


def extractor(request: Recorded) -> JSONReply | None:
    if not is_extraction(request):
        return None
    return llm_answer(
        [{"op": "ADD", "text": FACT}] if "theremin" in latest_exchange(request) else []
    )


@pytest.fixture
def gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> GatewayServer:
    upstream.script(extractor)
    config = gateway_config_for(
        upstream.url,
        tmp_path / "data",
        memory=memory_settings(upstream.url, search={"min_score": -1}),
    )
    return start_gateway(config)


def ask(
    http: httpx.Client, text: str, *, user: str | None = "carol", stream: bool = False
) -> httpx.Response:
    headers = {"X-User-Id": user} if user else {}
    return http.post(
        "/v1/chat/completions",
        headers=headers,
        json={
            "model": "gpt-test",
            "stream": stream,
            "messages": [{"role": "user", "content": text}],
        },
    )


def recent(gateway: GatewayServer) -> RecentRequests:
    ring: RecentRequests = gateway.app.state.recent_requests
    return ring


def test_each_chat_is_kept_with_what_memory_did_and_no_message(gateway: GatewayServer) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert ask(http, "I play the theremin on Sundays").status_code == 200
        wait_for(lambda: spool_drained(http), timeout=30)
        assert ask(http, "What do I play? The theremin?", stream=True).status_code == 200
        assert ask(http, "hello", user=None).status_code == 200
        http.get("/health")
    anonymous, streamed, told = recent(gateway).latest()
    assert (told.user_id, told.memory_status, told.injected, told.stream) == (
        "carol",
        "ok",
        0,
        False,
    )
    assert (streamed.memory_status, streamed.injected, streamed.stream) == ("ok", 1, True)
    assert (anonymous.user_id, anonymous.memory_status) == (None, "no-user")
    for r in (told, streamed, anonymous):
        assert (r.path, r.model, r.upstream, r.status) == (
            "/v1/chat/completions",
            "gpt-test",
            "scripted",
            200,
        )
        assert r.duration_ms > 0
    # Only chats are listed (not /health); no message text is kept anywhere.
    assert len(recent(gateway).latest()) == 3
    assert not any("theremin" in repr(r) for r in recent(gateway).latest())


def test_a_refused_chat_is_kept_with_its_status(gateway: GatewayServer) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        response = http.post(
            "/v1/chat/completions",
            headers={"X-User-Id": "carol", "X-Memory-Mode": "sometimes"},
            json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 400
    (refused,) = recent(gateway).latest()
    assert refused.status == 400


def test_requests_no_route_answers_and_failures_are_counted(gateway: GatewayServer) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        http.get("/nowhere")
        http.request("PROPFIND", "/health")
        http.post("/v1/chat/completions", content=b"[")
        text = http.get("/metrics").content
    requests = "memory_gateway_requests_total"
    assert value(text, requests, route="unmatched", method="GET", status="404") == 1
    assert value(text, requests, route="unmatched", method="other", status="405") == 1
    assert value(text, requests, route="/v1/chat/completions", method="POST", status="400") == 1


def test_the_debug_line_names_memory_ids_and_the_job_never_the_text(
    gateway: GatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        ask(http, "I play the theremin on Sundays")
        wait_for(lambda: spool_drained(http), timeout=30)
        with caplog.at_level(logging.DEBUG, logger="gateway.requests"):
            answer = ask(http, "Do I play the theremin on Sundays?")
    ids = answer.headers["X-Memory-Ids"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gateway.requests"]
    assert "/v1/chat/completions 200" in line
    assert "user=carol" in line and "memory=ok" in line and "injected=1" in line
    assert f"ids={ids}" in line
    assert "recorded=" in line and "recorded=-" not in line
    assert "theremin" not in line.lower() and FACT not in line
