"""Which key extraction sends where, and how the gateway shows extraction's state.

Rule: a key only ever goes to the endpoint it was configured or sent for.
The extraction endpoint is `memory.llm.base_url`, else the default upstream;
its key is `memory.llm.api_key`, else the key configured on the upstream at
that address, else a user's own key sent to that same upstream. A job with no
usable key waits with reason `no_key`.

The status side: `GET /v1/memories/stats` has an `extraction` section, chats
say `X-Memory-Status: ok; extraction=failing` while every recent job failed,
and `/ready` says so in its body while staying 200.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway.config import Config
from tests.extraction import is_extraction, llm_answer, wait_for
from tests.gateway_server import GatewayServer
from tests.upstream import JSONReply, Recorded, ScriptedUpstream, ServerThread

LOCAL_KEY = "sk-local-fixed"
BOB_KEY = "sk-bob-own"


@pytest.fixture
def second_upstream() -> Iterator[ScriptedUpstream]:
    """Another provider: a local server with its own configured key."""
    app = ScriptedUpstream()
    server = ServerThread(app).start()
    app.url = server.url + "/v1"
    yield app
    server.stop()


def remember(fact: str) -> Callable[[Recorded], JSONReply | None]:
    def answer(request: Recorded) -> JSONReply | None:
        return llm_answer([{"op": "ADD", "text": fact}]) if is_extraction(request) else None

    return answer


def config(
    default: ScriptedUpstream,
    tmp_path: Path,
    *,
    local: ScriptedUpstream | None = None,
    llm: dict[str, Any] | None = None,
) -> Config:
    upstreams: list[dict[str, Any]] = [{"name": "cloud", "base_url": default.url, "default": True}]
    if local is not None:
        upstreams.append(
            {"name": "local", "base_url": local.url, "api_key": LOCAL_KEY, "models": ["llama*"]}
        )
    raw = {
        "upstreams": upstreams,
        "data_dir": str(tmp_path / "data"),
        "memory": {
            "llm": {"failing_window_seconds": 300, **(llm or {})},
            "spool": {"backoff_initial": 0.05, "backoff_max": 0.2, "max_attempts": 2},
        },
    }
    return msgspec.convert(raw, Config)


def chat(gateway: GatewayServer, user: str, text: str, *, model: str, key: str) -> httpx.Response:
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}]},
        headers={"X-User-Id": user, "Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response


def jobs(gateway: GatewayServer, user: str) -> list[dict[str, Any]]:
    response = httpx.get(gateway.url + "/v1/memories/jobs", params={"user_id": user})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def extraction_section(gateway: GatewayServer) -> dict[str, Any]:
    response = httpx.get(gateway.url + "/v1/memories/stats")
    assert response.status_code == 200, response.text
    return dict(response.json()["extraction"])


def extraction_calls(upstream: ScriptedUpstream) -> list[Recorded]:
    return [r for r in upstream.requests if is_extraction(r)]


def test_a_key_configured_for_one_upstream_never_reaches_the_extraction_endpoint(
    start_gateway: Callable[..., GatewayServer],
    upstream: ScriptedUpstream,
    second_upstream: ScriptedUpstream,
    tmp_path: Path,
) -> None:
    """bob chats with `llama3`, routed to `local` with its configured key.
    Extraction goes to the default upstream, for which no key is configured:
    the job waits (`no_key`) instead of borrowing `local`'s key. His next
    chat to the default upstream brings his own key, which may go there."""
    upstream.script(remember("Likes llamas"))
    gateway = start_gateway(config(upstream, tmp_path, local=second_upstream))

    chat(gateway, "bob", "I like llamas", model="llama3", key=BOB_KEY)
    assert second_upstream.last("/v1/chat/completions").headers["authorization"] == (
        f"Bearer {LOCAL_KEY}"
    )
    [job] = wait_for(lambda: [j for j in jobs(gateway, "bob") if j["reason"] == "no_key"])
    assert job["state"] == "pending"
    assert extraction_calls(upstream) == []
    assert extraction_section(gateway)["jobs_by_reason"]["pending"] == {"no_key": 1}

    chat(gateway, "bob", "hello", model="gpt-4o-mini", key=BOB_KEY)
    wait_for(lambda: all(j["state"] == "done" for j in jobs(gateway, "bob")))
    calls = extraction_calls(upstream)
    assert calls and {c.headers["authorization"] for c in calls} == {f"Bearer {BOB_KEY}"}
    for request in upstream.requests:
        assert LOCAL_KEY not in request.headers.get("authorization", "")


def test_the_key_configured_on_the_extraction_upstream_is_used_for_every_job(
    start_gateway: Callable[..., GatewayServer],
    upstream: ScriptedUpstream,
    second_upstream: ScriptedUpstream,
    tmp_path: Path,
) -> None:
    """`memory.llm.base_url` names the `local` upstream: its configured key
    pays for extraction, and a user's key sent to another upstream is not used."""
    second_upstream.script(remember("Likes tea"))
    gateway = start_gateway(
        config(upstream, tmp_path, local=second_upstream, llm={"base_url": second_upstream.url})
    )
    chat(gateway, "carol", "I like tea", model="gpt-4o-mini", key="sk-carol-own")
    wait_for(lambda: [j for j in jobs(gateway, "carol") if j["state"] == "done"])
    calls = extraction_calls(second_upstream)
    assert {c.headers["authorization"] for c in calls} == {f"Bearer {LOCAL_KEY}"}
    section = extraction_section(gateway)
    assert section["endpoint"] == second_upstream.url
    assert section["key_source"] == "the api_key of upstream 'local'"
    assert section["status"] == "ok" and section["last_success_at"]


def open_models(request: Recorded) -> JSONReply | None:
    """A local server: lists its one model without a key."""
    if request.path.endswith("/models"):
        return JSONReply({"object": "list", "data": [{"id": "/models/tiny.gguf"}]})
    return None


def test_a_local_server_that_needs_no_key_runs_jobs_queued_through_the_api(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """No chat ever brought a key, but the endpoint answers `GET /models`
    without one: the job runs, with the one model it lists, and `?wait=true`
    answers with what the job applied."""
    upstream.script(open_models)
    upstream.script(remember("Works as a nurse"))
    gateway = start_gateway(config(upstream, tmp_path))
    wait_for(lambda: extraction_section(gateway)["model"] == "/models/tiny.gguf")
    response = httpx.post(
        gateway.url + "/v1/memories",
        params={"wait": "true"},
        json={"user_id": "dan", "text": "I work as a nurse"},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["job_state"] == "done", body
    assert [(op["op"], op["text"]) for op in body["operations"]] == [("ADD", "Works as a nurse")]
    [call] = extraction_calls(upstream)
    assert call.json["model"] == "/models/tiny.gguf"
    job = httpx.get(gateway.url + f"/v1/memories/jobs/{body['job_id']}").json()
    assert (job["state"], job["user_id"]) == ("done", "dan")
    assert httpx.get(gateway.url + "/v1/memories/jobs/nope").status_code == 404


def test_a_job_queued_through_the_api_without_a_usable_key_says_it_waits(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(config(upstream, tmp_path))
    wait_for(lambda: extraction_section(gateway)["endpoint"])
    response = httpx.post(
        gateway.url + "/v1/memories", json={"user_id": "erin", "text": "I am vegan"}, timeout=30
    )
    assert response.status_code == 201, response.text
    assert (response.json()["job_state"], response.json()["job_reason"]) == ("pending", "no_key")


def missing_model(request: Recorded) -> JSONReply | None:
    if not is_extraction(request):
        return None
    error = {
        "message": "The model `gpt-4o-mini` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    return JSONReply({"error": error}, status=404)


def test_when_every_recent_job_fails_chats_and_ready_say_so(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """The model is missing: the job fails for good at once (retrying cannot
    bring it back), chats keep working and say `extraction=failing`, `/ready`
    stays 200 and says it too, and the stats name the reason."""
    upstream.script(missing_model)
    gateway = start_gateway(config(upstream, tmp_path, llm={"api_key": "sk-extract"}))
    chat(gateway, "fay", "I live in Oslo", model="gpt-4o-mini", key="sk-fay")
    [job] = wait_for(lambda: [j for j in jobs(gateway, "fay") if j["state"] == "failed"])
    assert (job["reason"], job["attempts"]) == ("model_not_found", 1)

    status = wait_for(
        lambda: (
            s
            if (
                s := chat(gateway, "fay", "hi", model="gpt-4o-mini", key="sk-fay").headers[
                    "X-Memory-Status"
                ]
            )
            == "ok; extraction=failing"
            else None
        )
    )
    assert status == "ok; extraction=failing"
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "extraction": "failing"}
    section = extraction_section(gateway)
    assert section["status"] == "failing"
    assert section["last_error"]["reason"] == "model_not_found"
    assert "does not exist" in section["last_error"]["message"]
    assert section["jobs_by_reason"]["failed"]["model_not_found"] >= 1
