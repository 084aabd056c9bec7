"""`GET /metrics` (gateway/metrics_api.py): what a Prometheus scrape of a real
gateway reads after real chats, who may read it, and that no user is named
in it, with one process or with several."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.extraction import is_extraction, latest_exchange, llm_answer, wait_for
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import GatewayProcess, memory_settings, spool_drained
from tests.test_metrics import samples, value
from tests.upstream import JSONReply, Recorded, ScriptedUpstream

# Distinctive user ids: none may appear anywhere in the exposition.
USERS = ("alice-metrics-7f3a", "bob-metrics-91c2")
ADMIN = "admin-key-for-metrics"
SCRAPER = "scrape-only-key"
USER_KEY = "sk-gw-user-key-metrics"


def extractor(request: Recorded) -> JSONReply | None:
    """Remembers what the user says they like, and reports token usage."""
    if not is_extraction(request):
        return None
    exchange = latest_exchange(request)
    ops = [{"op": "ADD", "text": "Likes tea"}] if "tea" in exchange else []
    reply = llm_answer(ops)
    reply.body["usage"] = {"prompt_tokens": 500, "completion_tokens": 20, "total_tokens": 520}
    return reply


@pytest.fixture
def start(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> Callable[..., GatewayServer]:
    upstream.script(extractor)

    def start(**overrides: Any) -> GatewayServer:
        config = gateway_config_for(
            upstream.url,
            tmp_path / "data",
            memory=memory_settings(upstream.url, search={"min_score": -1}),
            **overrides,
        )
        return start_gateway(config)

    return start


def chat(http: httpx.Client, user: str, text: str) -> httpx.Response:
    response = http.post(
        "/v1/chat/completions",
        headers={"X-User-Id": user},
        json={"model": "gpt-test", "messages": [{"role": "user", "content": text}]},
    )
    assert response.status_code == 200, response.text
    return response


def test_a_scrape_after_chats_reports_requests_memory_and_extraction(
    start: Callable[..., GatewayServer],
) -> None:
    gateway = start()
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for user in USERS:
            chat(http, user, "I like tea")
        wait_for(lambda: spool_drained(http), timeout=30)
        # Now each user has a memory to inject.
        for user in USERS:
            assert chat(http, user, "Which drink do I like?").headers["X-Memory-Injected"] == "1"
        wait_for(lambda: spool_drained(http), timeout=30)
        bad = http.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400
        http.get("/no/such/page")
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.content

    requests = "memory_gateway_requests_total"
    route = "/v1/chat/completions"
    assert value(text, requests, route=route, method="POST", status="200") == 4
    assert value(text, requests, route=route, method="POST", status="400") == 1
    assert value(text, requests, route="unmatched", method="GET", status="404") == 1
    assert value(text, "memory_gateway_request_duration_seconds_count", route=route) == 5
    # The chats; extraction calls go from the engine's own client, not through the proxy.
    assert value(text, "memory_gateway_upstream_duration_seconds_count", upstream="scripted") == 4
    assert value(text, "memory_gateway_memory_status_total", status="ok") == 4
    assert value(text, "memory_gateway_memory_retrieval_seconds_count", outcome="ok") == 4
    assert value(text, "memory_gateway_memory_injected_total") == 2
    ops = "memory_gateway_memory_operations_total"
    assert value(text, ops, op="ADD") == 2
    assert value(text, ops, op="NONE") == 2  # the two questions taught nothing
    tokens = "memory_gateway_extraction_llm_tokens_total"
    assert value(text, tokens, kind="prompt") == 4 * 500
    assert value(text, tokens, kind="completion") == 4 * 20
    assert value(text, "memory_gateway_extraction_jobs", state="done") == 4
    assert value(text, "memory_gateway_extraction_jobs", state="pending") == 0
    assert value(text, "memory_gateway_extraction_lag_seconds") == 0
    assert value(text, "memory_gateway_extraction_failing") == 0
    assert value(text, "memory_gateway_store_rows") == 2


def test_no_user_is_named_in_any_label_or_value(start: Callable[..., GatewayServer]) -> None:
    gateway = start()
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for user in USERS:
            chat(http, user, "I like tea")
            http.get("/v1/memories", params={"user_id": user})
        wait_for(lambda: spool_drained(http), timeout=30)
        text = http.get("/metrics").text
    for user in USERS:
        assert user not in text
    labels = {name for (_, pairs) in samples(text.encode()) for name, _ in pairs}
    assert labels <= {
        "route",
        "method",
        "status",
        "upstream",
        "outcome",
        "op",
        "kind",
        "state",
        "le",
    }


def test_the_memory_api_is_counted_by_route_template_not_by_user(
    start: Callable[..., GatewayServer],
) -> None:
    gateway = start()
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for n in range(3):
            http.get(f"/v1/memories/no-such-id-{n}", params={"user_id": USERS[0]})
        text = http.get("/metrics").content
    assert (
        value(
            text,
            "memory_gateway_requests_total",
            route="/v1/memories/{memory_id}",
            method="GET",
            status="404",
        )
        == 3
    )


def test_with_an_admin_key_metrics_need_it_or_the_scrape_key(
    start: Callable[..., GatewayServer],
) -> None:
    gateway = start(
        auth={"admin_key": ADMIN, "keys": [{"key": USER_KEY, "user_id": USERS[0]}]},
        metrics={"key": SCRAPER},
    )
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        anonymous = http.get("/metrics")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        as_user = http.get("/metrics", headers={"Authorization": f"Bearer {USER_KEY}"})
        assert as_user.status_code == 403
        for key in (ADMIN, SCRAPER):
            response = http.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200
            assert b"memory_gateway_requests_total" in response.content
        # The scrape key reads metrics and nothing else.
        memories = http.get(
            "/v1/memories",
            params={"user_id": USERS[0]},
            headers={"Authorization": f"Bearer {SCRAPER}"},
        )
        assert memories.status_code == 401


def test_metrics_can_be_turned_off(start: Callable[..., GatewayServer]) -> None:
    gateway = start(metrics={"enabled": False})
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        chat(http, USERS[0], "hello")
        response = http.get("/metrics")
    assert response.status_code == 404
    assert "metrics.enabled" in response.json()["error"]["message"]


def test_with_memory_off_the_request_metrics_remain(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(gateway_config_for(upstream.url, tmp_path / "data"))
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        chat(http, USERS[0], "hello")
        text = http.get("/metrics").content
    route = "/v1/chat/completions"
    assert (
        value(text, "memory_gateway_requests_total", route=route, method="POST", status="200") == 1
    )
    assert value(text, "memory_gateway_memory_status_total", status="off") == 1
    assert b"memory_gateway_extraction_jobs" not in text


def test_workers_and_the_extraction_process_report_through_one_endpoint(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """Two serving processes and the extraction process: whichever worker
    answers the scrape reports every process's counts."""
    upstream.script(extractor)
    config = {
        "upstreams": [{"name": "scripted", "base_url": upstream.url, "default": True}],
        "data_dir": str(tmp_path / "data"),
        "server": {"log_level": "warning", "workers": 2, "extraction": "process"},
        "memory": memory_settings(upstream.url),
    }

    def shared_dirs() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("memory-gateway-metrics-*"))

    before = shared_dirs()
    gateway = GatewayProcess(config, tmp_path).start()
    assert len(shared_dirs() - before) == 1  # where the processes write their values
    try:
        chats = 12
        for n in range(chats):
            # A new connection each time, so the kernel spreads them over the workers.
            with httpx.Client(base_url=gateway.url, timeout=30) as http:
                chat(http, USERS[n % 2], "I like tea" if n < 2 else f"question {n}")
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            wait_for(lambda: spool_drained(http), timeout=60, interval=0.2)
        route = "/v1/chat/completions"
        for _ in range(4):
            with httpx.Client(base_url=gateway.url, timeout=30) as http:
                text = http.get("/metrics").content
            assert (
                value(
                    text, "memory_gateway_requests_total", route=route, method="POST", status="200"
                )
                == chats
            )
            # Counted in the extraction process.
            assert value(text, "memory_gateway_memory_operations_total", op="ADD") == 2
            assert (
                value(text, "memory_gateway_extraction_llm_tokens_total", kind="prompt")
                == chats * 500
            )
            assert value(text, "memory_gateway_extraction_jobs", state="done") == chats
    finally:
        assert gateway.terminate() == 0
    # The supervisor removed the directory it made for the processes' values.
    assert shared_dirs() - before == set()
