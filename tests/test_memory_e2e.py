"""Zero-code long-term memory, end to end.

The app is the official `openai` SDK pointed at the real gateway over HTTP; the
scripted upstream answers both the app's chat calls and the gateway's own
extraction calls, so every test sees exactly what reached the provider.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.extraction import (
    is_extraction,
    latest_exchange,
    llm_answer,
    stored_facts,
    wait_for,
)
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.upstream import JSONReply, Recorded, ScriptedUpstream

ALICE = {"X-User-Id": "alice"}
BOB = {"X-User-Id": "bob"}


def extractor(request: Recorded) -> JSONReply | None:
    """A deterministic stand-in for the extraction model."""
    if not is_extraction(request):
        return None
    conversation = latest_exchange(request)
    ops: list[dict[str, Any]] = []
    if "peanuts" in conversation:
        ops += [
            {"op": "ADD", "text": "Allergic to peanuts"},
            {"op": "ADD", "text": "Lives in Berlin"},
        ]
    if "Munich" in conversation:
        for fact in stored_facts(request):
            if "Berlin" in fact["text"]:
                ops.append({"op": "UPDATE", "id": fact["id"], "text": "Lives in Munich"})
    if "上海" in conversation:
        ops.append({"op": "ADD", "text": "住在上海"})
    return llm_answer(ops)


@pytest.fixture
def memory_upstream(upstream: ScriptedUpstream) -> ScriptedUpstream:
    upstream.script(extractor)
    return upstream


@pytest.fixture
def start_memory_gateway(
    start_gateway: Callable[..., GatewayServer], memory_upstream: ScriptedUpstream, tmp_path: Path
) -> Callable[..., GatewayServer]:
    def start(**overrides: Any) -> GatewayServer:
        memory = {
            "spool": {"backoff_initial": 0.05, "backoff_max": 0.2},
            **overrides.pop("memory", {}),
        }
        config = gateway_config_for(
            memory_upstream.url, tmp_path / "data", memory=memory, **overrides
        )
        return start_gateway(config)

    return start


@pytest.fixture
def memory_gateway(start_memory_gateway: Callable[..., GatewayServer]) -> GatewayServer:
    return start_memory_gateway()


@pytest.fixture
def admin(memory_gateway: GatewayServer) -> Iterator[httpx.Client]:
    """The management API, as a loopback client (no admin key configured)."""
    with httpx.Client(base_url=memory_gateway.url, timeout=30) as http:
        yield http


def memories_of(http: httpx.Client, user: str) -> list[dict[str, Any]]:
    response = http.get("/v1/memories", params={"user_id": user})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def texts_of(http: httpx.Client, user: str) -> set[str]:
    return {m["text"] for m in memories_of(http, user)}


def chat_requests(upstream: ScriptedUpstream) -> list[Recorded]:
    return [
        r
        for r in upstream.requests
        if r.path.endswith("/chat/completions") and not is_extraction(r)
    ]


def ask(client: openai.OpenAI, text: str, headers: dict[str, str], *, stream: bool) -> Any:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": text},
    ]
    if not stream:
        return client.chat.completions.with_raw_response.create(
            model="test-model", messages=messages, extra_headers=headers
        )
    with client.chat.completions.with_streaming_response.create(
        model="test-model", messages=messages, extra_headers=headers, stream=True
    ) as response:
        for _ in response.parse():
            pass
        return response


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_fact_told_once_is_injected_into_later_conversations_of_that_user_only(
    memory_gateway: GatewayServer,
    memory_upstream: ScriptedUpstream,
    admin: httpx.Client,
    stream: bool,
) -> None:
    client = memory_gateway.client()
    ask(client, "I'm allergic to peanuts and I live in Berlin", ALICE, stream=stream)
    wait_for(lambda: len(memories_of(admin, "alice")) == 2)
    assert texts_of(admin, "alice") == {"Allergic to peanuts", "Lives in Berlin"}

    response = ask(client, "Which snacks are safe with my allergy?", ALICE, stream=stream)
    assert response.headers["X-Memory-Status"] == "ok"
    assert int(response.headers["X-Memory-Injected"]) >= 1
    sent = chat_requests(memory_upstream)[-1].json["messages"]
    # The app's own messages are untouched; the memory message sits before the last user turn.
    assert sent[0] == {"role": "system", "content": "You are helpful."}
    assert sent[-1] == {"role": "user", "content": "Which snacks are safe with my allergy?"}
    assert sent[1]["role"] == "system" and "Allergic to peanuts" in sent[1]["content"]
    ids = response.headers["X-Memory-Ids"].split(",")
    assert set(ids) <= {m["id"] for m in memories_of(admin, "alice")}

    response = ask(client, "Which snacks are safe with my allergy?", BOB, stream=stream)
    assert response.headers["X-Memory-Injected"] == "0"
    sent = chat_requests(memory_upstream)[-1].json["messages"]
    assert "peanuts" not in json.dumps(sent)


def test_a_contradiction_updates_the_fact_and_history_keeps_both(
    memory_gateway: GatewayServer, admin: httpx.Client
) -> None:
    client = memory_gateway.client()
    ask(client, "I'm allergic to peanuts and I live in Berlin", ALICE, stream=False)
    wait_for(lambda: "Lives in Berlin" in texts_of(admin, "alice"))
    ask(client, "I moved to Munich last month", ALICE, stream=True)
    wait_for(lambda: "Lives in Munich" in texts_of(admin, "alice"))
    assert texts_of(admin, "alice") == {"Allergic to peanuts", "Lives in Munich"}

    munich = next(m for m in memories_of(admin, "alice") if m["text"] == "Lives in Munich")
    history = admin.get(f"/v1/memories/{munich['id']}/history", params={"user_id": "alice"})
    assert history.status_code == 200
    texts = [(e["event"], e["old_text"], e["new_text"]) for e in history.json()["data"]]
    assert ("UPDATE", "Lives in Berlin", "Lives in Munich") in texts

    everything = admin.get(
        "/v1/memories", params={"user_id": "alice", "include_superseded": "true"}
    ).json()["data"]
    assert "Lives in Berlin" in {m["text"] for m in everything}


def test_resent_history_is_not_extracted_twice(
    memory_gateway: GatewayServer, memory_upstream: ScriptedUpstream, admin: httpx.Client
) -> None:
    client = memory_gateway.client()
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "I'm allergic to peanuts and I live in Berlin"}
    ]
    first = client.chat.completions.create(
        model="test-model", messages=history, extra_headers=ALICE
    )
    wait_for(lambda: len(memories_of(admin, "alice")) == 2)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Thanks! Any dessert ideas?"},
    ]
    client.chat.completions.create(model="test-model", messages=history, extra_headers=ALICE)
    calls = wait_for(
        lambda: (
            [r for r in memory_upstream.requests if is_extraction(r)][1:]
            and [r for r in memory_upstream.requests if is_extraction(r)]
        )
    )
    assert len(calls) == 2
    conversation = latest_exchange(calls[1])
    assert "dessert" in conversation
    assert "peanuts" not in conversation
    assert len(memories_of(admin, "alice")) == 2


def test_a_chinese_fact_stays_chinese(memory_gateway: GatewayServer, admin: httpx.Client) -> None:
    client = memory_gateway.client()
    ask(client, "我住在上海", ALICE, stream=False)
    wait_for(lambda: "住在上海" in texts_of(admin, "alice"))
    found = admin.post("/v1/memories/search", json={"query": "我住在哪里", "user_id": "alice"})
    assert found.json()["results"][0]["memory"]["text"] == "住在上海"


def test_slow_retrieval_degrades_to_no_memories_and_the_answer_still_arrives(
    start_memory_gateway: Callable[..., GatewayServer], memory_upstream: ScriptedUpstream
) -> None:
    gateway = start_memory_gateway(memory={"injection": {"deadline_ms": 1}})
    engine = gateway.app.state.hooks.engine
    real_search = engine.store.search

    async def slow_search(*args: Any, **kwargs: Any) -> Any:
        import asyncio

        await asyncio.sleep(0.5)
        return await real_search(*args, **kwargs)

    engine.store.search = slow_search
    response = ask(gateway.client(), "hello", ALICE, stream=True)
    assert response.headers["X-Memory-Status"] == "degraded"
    assert response.status_code == 200


def test_the_extraction_model_is_called_through_the_proxys_upstream_client(
    memory_gateway: GatewayServer, admin: httpx.Client
) -> None:
    """One pool of upstream connections (and one connection layer) for chat
    requests and the extraction calls they cause."""
    state = memory_gateway.app.state
    assert state.hooks.engine.extractor._http_client is state.proxy.client
    ask(memory_gateway.client(), "I'm allergic to peanuts.", ALICE, stream=False)
    wait_for(lambda: len(memories_of(admin, "alice")) == 2)


def test_an_app_embedded_in_another_program_leaves_its_garbage_collector_alone(
    memory_gateway: GatewayServer,
) -> None:
    """Only `memory-gateway serve` freezes its start-up objects (gc.freeze):
    in a host program (here pytest) they are the host's to collect."""
    import gc

    assert gc.get_freeze_count() == 0


def test_a_broken_store_degrades_instead_of_failing_the_chat(
    memory_gateway: GatewayServer,
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk on fire")

    memory_gateway.app.state.hooks.engine.store.search = broken
    response = ask(memory_gateway.client(), "hello", ALICE, stream=False)
    assert response.headers["X-Memory-Status"] == "degraded"
    assert response.parse().choices[0].message.content == "echo: hello"


def test_requests_without_a_user_pass_through_untouched(
    memory_gateway: GatewayServer, memory_upstream: ScriptedUpstream
) -> None:
    raw = b'{"model":"test-model","messages":[{"role":"user","content":"hi"}],"x_vendor":1}'
    with httpx.Client(base_url=memory_gateway.url) as http:
        response = http.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert response.headers["X-Memory-Status"] == "no-user"
    assert chat_requests(memory_upstream)[-1].body == raw


@pytest.mark.parametrize("mode", ["off", "write"])
def test_memory_mode_header_stops_reading(
    memory_gateway: GatewayServer,
    memory_upstream: ScriptedUpstream,
    admin: httpx.Client,
    mode: str,
) -> None:
    admin.post("/v1/memories", json={"user_id": "alice", "text": "Likes tea", "infer": False})
    response = ask(
        memory_gateway.client(), "Any drink?", {**ALICE, "X-Memory-Mode": mode}, stream=False
    )
    assert response.headers["X-Memory-Status"] == ("off" if mode == "off" else "ok")
    assert "Likes tea" not in json.dumps(chat_requests(memory_upstream)[-1].json)


def test_read_mode_injects_but_does_not_record(
    memory_gateway: GatewayServer, memory_upstream: ScriptedUpstream, admin: httpx.Client
) -> None:
    admin.post("/v1/memories", json={"user_id": "alice", "text": "Likes tea", "infer": False})
    response = ask(
        memory_gateway.client(),
        "Any drink? By the way, I am allergic to peanuts.",
        {**ALICE, "X-Memory-Mode": "read"},
        stream=False,
    )
    assert response.headers["X-Memory-Status"] == "ok"
    assert response.headers["X-Memory-Injected"] == "1"
    time.sleep(0.3)
    assert not [r for r in memory_upstream.requests if is_extraction(r)]
    assert admin.get("/v1/memories/stats").json()["spool"]["pending"] == 0


def test_an_invalid_memory_mode_is_a_400(memory_gateway: GatewayServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(memory_gateway.client(), "hi", {**ALICE, "X-Memory-Mode": "sometimes"}, stream=False)
    assert caught.value.body["param"] == "X-Memory-Mode"


# --- the management API ------------------------------------------------------


def test_management_round_trip(admin: httpx.Client) -> None:
    added = admin.post(
        "/v1/memories",
        json={"user_id": "alice", "text": "Plays the cello", "infer": False, "metadata": {"k": 1}},
    )
    assert added.status_code == 201, added.text
    memory = added.json()["results"][0]
    assert memory["text"] == "Plays the cello" and memory["metadata"] == {"k": 1}
    mid = memory["id"]

    assert admin.get(f"/v1/memories/{mid}", params={"user_id": "alice"}).json()["id"] == mid
    updated = admin.put(
        f"/v1/memories/{mid}", params={"user_id": "alice"}, json={"text": "Plays the viola"}
    )
    assert updated.json()["text"] == "Plays the viola"
    events = admin.get(f"/v1/memories/{mid}/history", params={"user_id": "alice"}).json()["data"]
    assert [e["event"] for e in events] == ["ADD", "UPDATE"]

    found = admin.post("/v1/memories/search", json={"query": "viola music", "user_id": "alice"})
    assert found.json()["results"][0]["memory"]["id"] == mid

    exported = admin.get("/v1/memories/export", params={"user_id": "alice"})
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    lines = exported.text.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["id"] == mid

    assert admin.get("/v1/memories/users").json()["data"] == [{"user_id": "alice", "memories": 1}]

    assert admin.delete(f"/v1/memories/{mid}", params={"user_id": "alice"}).json() == {"deleted": 1}
    assert memories_of(admin, "alice") == []
    imported = admin.post(
        "/v1/memories/import", params={"user_id": "alice"}, content=exported.content
    )
    assert imported.json() == {"imported": 1, "skipped": [], "failed": []}
    assert texts_of(admin, "alice") == {"Plays the viola"}


def test_another_users_memory_answers_404_like_a_missing_one(admin: httpx.Client) -> None:
    mid = admin.post(
        "/v1/memories", json={"user_id": "alice", "text": "Secret fact", "infer": False}
    ).json()["results"][0]["id"]
    for method in ("GET", "DELETE"):
        theirs = admin.request(method, f"/v1/memories/{mid}", params={"user_id": "bob"})
        missing = admin.request(method, "/v1/memories/no-such-id", params={"user_id": "bob"})
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"]["type"] == missing.json()["error"]["type"]
    put = admin.put(f"/v1/memories/{mid}", params={"user_id": "bob"}, json={"text": "x"})
    assert put.status_code == 404
    assert texts_of(admin, "alice") == {"Secret fact"}


def test_erasing_a_user_forgets_memories_history_and_pending_jobs(
    memory_gateway: GatewayServer, admin: httpx.Client
) -> None:
    mid = admin.post(
        "/v1/memories", json={"user_id": "alice", "text": "Likes tea", "infer": False}
    ).json()["results"][0]["id"]
    admin.post("/v1/memories", json={"user_id": "bob", "text": "Likes coffee", "infer": False})
    erased = admin.delete("/v1/memories", params={"user_id": "alice"})
    assert erased.status_code == 200 and erased.json()["deleted"] >= 1
    assert memories_of(admin, "alice") == []
    assert admin.get(f"/v1/memories/{mid}/history", params={"user_id": "alice"}).status_code == 404
    assert texts_of(admin, "bob") == {"Likes coffee"}


def test_the_management_api_requires_the_admin_key_when_one_is_set(
    start_memory_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = start_memory_gateway(
        auth={"admin_key": "adm-secret", "keys": [{"key": "gk-alice", "user_id": "alice"}]}
    )
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        anonymous = http.get("/v1/memories", params={"user_id": "alice"})
        assert anonymous.status_code == 401
        assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}
        wrong = http.get(
            "/v1/memories", params={"user_id": "alice"}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401

        admin = {"Authorization": "Bearer adm-secret"}
        add = http.post(
            "/v1/memories",
            headers=admin,
            json={"user_id": "bob", "text": "Bob's fact", "infer": False},
        )
        assert add.status_code == 201
        bob_id = add.json()["results"][0]["id"]

        alice = {"Authorization": "Bearer gk-alice"}
        mine = http.post(
            "/v1/memories", headers=alice, json={"text": "Alice's fact", "infer": False}
        )
        assert mine.status_code == 201 and mine.json()["results"][0]["user_id"] == "alice"
        assert http.get("/v1/memories", headers=alice).json()["data"][0]["text"] == "Alice's fact"
        assert http.get("/v1/memories", headers=alice, params={"user_id": "bob"}).status_code == 403
        assert http.get(f"/v1/memories/{bob_id}", headers=alice).status_code == 404
        assert http.get("/v1/memories/users", headers=alice).status_code == 403
        assert http.get("/v1/memories/users", headers=admin).status_code == 200


def test_an_import_with_a_per_user_key_cannot_probe_other_users_ids(
    start_memory_gateway: Callable[..., GatewayServer],
) -> None:
    """An administrator's import of a user's export restores its ids; a
    per-user key's import gets ids derived from its user, the same whether
    or not another user holds the id it names."""
    gateway = start_memory_gateway(
        auth={"admin_key": "adm-secret", "keys": [{"key": "gk-alice", "user_id": "alice"}]}
    )
    admin = {"Authorization": "Bearer adm-secret"}
    alice = {"Authorization": "Bearer gk-alice"}
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        bob_id = http.post(
            "/v1/memories", headers=admin, json={"user_id": "bob", "text": "Bob's", "infer": False}
        ).json()["results"][0]["id"]

        def line(memory_id: str, text: str) -> str:
            return json.dumps(
                {
                    "id": memory_id,
                    "user_id": "alice",
                    "agent_id": None,
                    "session_id": None,
                    "text": text,
                    "metadata": {},
                    "created_at": "2026-01-01T00:00:00Z",
                    "updated_at": "2026-01-01T00:00:00Z",
                }
            )

        body = f"{line(bob_id, 'probe')}\n\n{line('free-id', 'other probe')}\n{line('', 'x')}\n"
        result = http.post("/v1/memories/import", headers=alice, content=body)
        assert result.status_code == 200, result.text
        assert result.json()["imported"] == 2
        # Line numbers count the blank line, as an editor shows them.
        assert [(f["line"], f["reason"]) for f in result.json()["failed"]] == [(4, "invalid_id")]
        ids = {m["id"] for m in http.get("/v1/memories", headers=alice).json()["data"]}
        assert ids.isdisjoint({bob_id, "free-id"})

        restored = http.post(
            "/v1/memories/import",
            headers=admin,
            params={"user_id": "alice"},
            content=line("restored-id", "restored"),
        )
        assert restored.json()["imported"] == 1
        got = http.get("/v1/memories/restored-id", headers=alice)
        assert got.status_code == 200 and got.json()["text"] == "restored"


@pytest.mark.parametrize(
    ("headers", "local"),
    [
        ({}, True),
        ({"Host": "localhost:8080"}, True),
        ({"Host": "[::1]:8080", "Origin": "http://127.0.0.1:3000"}, True),
        ({"Host": "attacker.example:8080"}, False),  # a page that rebound its name
        ({"Origin": "https://attacker.example"}, False),
        ({"Origin": "null"}, False),
        ({"X-Forwarded-For": "203.0.113.7"}, False),  # a proxy on this machine
        ({"Forwarded": "for=203.0.113.7"}, False),
    ],
)
def test_without_an_admin_key_only_a_local_client_is_admin(
    admin: httpx.Client, headers: dict[str, str], local: bool
) -> None:
    """A loopback peer alone is not enough: a browser page under a rebound
    name, or anyone behind a reverse proxy on this machine, arrives from
    127.0.0.1 too."""
    response = admin.get("/v1/memories/users", headers=headers)
    assert response.status_code == (200 if local else 401), response.text
    if not local:
        assert "local client" in response.json()["error"]["message"]


def test_the_management_api_is_in_the_openapi_schema(admin: httpx.Client) -> None:
    schema = admin.get("/schema/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/v1/memories" in paths and "/v1/memories/search" in paths
    assert "/v1/chat/completions" not in paths


def test_bad_management_input_gets_openai_shaped_errors(admin: httpx.Client) -> None:
    missing_user = admin.get("/v1/memories")
    assert missing_user.status_code == 400
    assert missing_user.json()["error"]["param"] == "user_id"
    bad_json = admin.post(
        "/v1/memories", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400
    assert "error" in bad_json.json()
    hostile = admin.get("/v1/memories", params={"user_id": "x" * 300})
    assert hostile.status_code == 400
    neither = admin.post("/v1/memories", json={"user_id": "alice", "infer": False})
    assert neither.status_code == 400
    bad_import = admin.post("/v1/memories/import", params={"user_id": "a"}, content=b"{oops}\n")
    assert bad_import.status_code == 400
