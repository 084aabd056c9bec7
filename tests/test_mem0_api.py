"""The mem0 Platform API (gateway/mem0_api.py), driven by mem0's own
`MemoryClient` from PyPI over real HTTP: a mem0 app works unchanged, a
per-user key sees only its user, the admin key may name any."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# mem0 reads these when imported: no telemetry, no writes to the home directory.
os.environ.setdefault("MEM0_TELEMETRY", "false")
os.environ.setdefault("MEM0_DIR", os.path.join(tempfile.gettempdir(), "mem0-tests"))

from mem0 import MemoryClient
from mem0.exceptions import (
    AuthenticationError,
    MemoryNotFoundError,
    ValidationError,
)

from tests.extraction import is_extraction, latest_exchange, llm_answer, wait_for
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.upstream import JSONReply, Recorded, ScriptedUpstream

ADMIN = "adm-secret"
KEYS = [{"key": "gk-alice", "user_id": "alice"}, {"key": "gk-bob", "user_id": "bob"}]


def extractor(request: Recorded) -> JSONReply | None:
    if is_extraction(request) and "hiking" in latest_exchange(request):
        return llm_answer([{"op": "ADD", "text": "Loves hiking in the Alps"}])
    return None


@pytest.fixture
def gateway(upstream: ScriptedUpstream, tmp_path: Path) -> Iterator[GatewayServer]:
    """A memory gateway with an admin key and two per-user keys, serving `/mem0`."""
    upstream.script(extractor)
    config = gateway_config_for(
        upstream.url,
        tmp_path / "data",
        memory={
            "llm": {"api_key": "sk-extract", "model": "gpt-4o-mini"},
            "spool": {"backoff_initial": 0.05, "backoff_max": 0.2},
        },
        auth={"keys": KEYS, "admin_key": ADMIN},
    )
    server = GatewayServer(config, None)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def connect(gateway: GatewayServer) -> Iterator[Callable[[str], Any]]:
    clients: list[Any] = []

    def make(key: str) -> Any:
        client = MemoryClient(api_key=key, host=gateway.url + "/mem0")
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.client.close()


def texts(page: dict[str, Any]) -> list[str]:
    return [m["memory"] for m in page["results"]]


def event_status(client: Any, event_id: str) -> str:
    response = client.client.get(f"/v1/event/{event_id}/")
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


def test_the_mem0_client_works_unchanged(connect: Callable[[str], Any]) -> None:
    alice = connect("gk-alice")
    mine = {"user_id": "alice"}
    added = alice.add("I live in Lisbon", user_id="alice", infer=False, metadata={"k": "v"})
    (lisbon,) = added["results"]
    assert (lisbon["memory"], lisbon["event"], lisbon["metadata"]) == (
        "I live in Lisbon",
        "ADD",
        {"k": "v"},
    )
    chat = [
        {"role": "user", "content": "I have a dog named Rex"},
        {"role": "assistant", "content": "Rex is a great name!"},
    ]
    alice.add(chat, user_id="alice", infer=False)

    found = alice.search("where do I live?", filters=mine)["results"]
    assert found[0]["memory"] == "I live in Lisbon"
    assert 0.0 <= found[0]["score"] <= 1.0
    listed = alice.get_all(filters=mine)
    assert (listed["count"], texts(listed)) == (2, ["I live in Lisbon", "I have a dog named Rex"])
    first = alice.get_all(filters=mine, page=1, page_size=1)
    assert (first["count"], len(first["results"]), first["previous"]) == (2, 1, None)
    assert "page=2" in first["next"]

    assert alice.get(lisbon["id"])["memory"] == "I live in Lisbon"
    updated = alice.update(lisbon["id"], text="I live in Porto")
    assert (updated["id"], updated["memory"]) == (lisbon["id"], "I live in Porto")
    history = alice.history(lisbon["id"])
    assert [(h["event"], h["new_memory"]) for h in history] == [
        ("ADD", "I live in Lisbon"),
        ("UPDATE", "I live in Porto"),
    ]
    assert alice.delete(lisbon["id"])["message"]
    with pytest.raises(MemoryNotFoundError):
        alice.get(lisbon["id"])
    assert [(u["name"], u["type"]) for u in alice.users()["results"]] == [("alice", "user")]
    alice.delete_all(user_id="alice")
    assert alice.get_all(filters=mine)["count"] == 0

    queued = alice.add("I love hiking in the Alps every summer", user_id="alice")
    assert queued["status"] == "PENDING"
    wait_for(lambda: event_status(alice, queued["event_id"]) == "SUCCEEDED")
    assert texts(alice.get_all(filters=mine)) == ["Loves hiking in the Alps"]


def test_a_per_user_key_cannot_see_or_touch_another_users_memories(
    connect: Callable[[str], Any],
) -> None:
    alice, bob = connect("gk-alice"), connect("gk-bob")
    (secret,) = alice.add("My secret word is tangerine", user_id="alice", infer=False)["results"]
    queued = alice.add("I love hiking in the Alps", user_id="alice")
    # Id-only calls: another user's id is answered like a missing one.
    for call in (
        lambda: bob.get(secret["id"]),
        lambda: bob.update(secret["id"], text="tampered"),
        lambda: bob.history(secret["id"]),
        lambda: bob.delete(secret["id"]),
    ):
        with pytest.raises(MemoryNotFoundError):
            call()
    assert bob.client.get(f"/v1/event/{queued['event_id']}/").status_code == 404
    # Naming alice is refused outright.
    for call in (
        lambda: bob.search("secret word", filters={"user_id": "alice"}),
        lambda: bob.get_all(filters={"user_id": "alice"}),
        lambda: bob.add("I am alice now", user_id="alice", infer=False),
        lambda: bob.delete_all(user_id="alice"),
        lambda: bob.delete_users(user_id="alice"),
    ):
        with pytest.raises(AuthenticationError, match="only manage its own user"):
            call()
    # A per-user key may leave the user out: it means its own.
    assert bob.search("secret word", filters={})["results"] == []
    assert bob.get_all()["count"] == 0
    assert bob.users()["results"] == []
    assert alice.get(secret["id"])["memory"] == "My secret word is tangerine"


def test_the_admin_key_may_name_any_user(connect: Callable[[str], Any]) -> None:
    admin = connect(ADMIN)
    (bob_fact,) = admin.add("Plays the violin", user_id="bob", infer=False)["results"]
    admin.add("Speaks Portuguese", user_id="carol", agent_id="tutor", infer=False)
    # Ids alone find their owner.
    assert admin.get(bob_fact["id"])["user_id"] == "bob"
    assert admin.update(bob_fact["id"], text="Plays the viola")["memory"] == "Plays the viola"
    assert len(admin.history(bob_fact["id"])) == 2
    assert {u["name"] for u in admin.users()["results"]} == {"bob", "carol"}
    carol = admin.get_all(filters={"AND": [{"user_id": "carol"}, {"agent_id": "tutor"}]})
    assert [(m["memory"], m["agent_id"]) for m in carol["results"]] == [
        ("Speaks Portuguese", "tutor")
    ]
    with pytest.raises(ValidationError, match="name the user"):
        admin.get_all(filters={"agent_id": "tutor"})
    admin.delete_users(user_id="carol")
    assert admin.get_all(filters={"user_id": "carol"})["count"] == 0
    assert admin.delete(bob_fact["id"])["message"]
    with pytest.raises(MemoryNotFoundError):
        admin.get(bob_fact["id"])


def test_the_supported_filters_narrow_the_results(connect: Callable[[str], Any]) -> None:
    admin = connect(ADMIN)
    admin.add("Likes tea", user_id="dan", agent_id="chef", run_id="r1", infer=False)
    admin.add("Likes coffee", user_id="dan", agent_id="coach", run_id="r2", infer=False)
    admin.add("Likes juice", user_id="dan", app_id="kitchen", infer=False)

    def listed(filters: dict[str, Any]) -> list[str]:
        return sorted(texts(admin.get_all(filters={"AND": [{"user_id": "dan"}, filters]})))

    assert listed({"agent_id": {"in": ["chef", "coach"]}}) == ["Likes coffee", "Likes tea"]
    assert listed({"run_id": "r2"}) == ["Likes coffee"]
    assert listed({"app_id": "kitchen"}) == ["Likes juice"]
    assert len(listed({"created_at": {"gte": "2000-01-01", "lte": "2999-12-31"}})) == 3
    assert listed({"created_at": {"lte": "2000-01-01"}}) == []
    found = admin.search("drinks", filters={"user_id": "dan", "run_id": "r1"})["results"]
    assert [m["memory"] for m in found] == ["Likes tea"]
    admin.delete_all(user_id="dan", app_id="kitchen")
    assert listed({}) == ["Likes coffee", "Likes tea"]


@pytest.mark.parametrize(
    ("filters", "named"),
    [
        ({"OR": [{"user_id": "alice"}, {"user_id": "bob"}]}, "the OR operator"),
        ({"user_id": "alice", "metadata": {"k": "v"}}, "the field 'metadata'"),
        ({"user_id": {"ne": "bob"}}, "the operator 'ne' on user_id"),
        ({"AND": [{"user_id": "alice"}, {"agent_id": "*"}]}, "wildcard"),
        ({"user_id": "alice", "created_at": {"eq": "2026-01-01"}}, "'eq' on created_at"),
        ({"user_id": "alice", "categories": {"in": ["x"]}}, "the field 'categories'"),
    ],
)
def test_unsupported_filters_are_a_400_naming_what(
    connect: Callable[[str], Any], gateway: GatewayServer, filters: dict[str, Any], named: str
) -> None:
    admin = connect(ADMIN)
    with pytest.raises(ValidationError, match="not supported"):
        admin.search("anything", filters=filters)
    response = httpx.post(
        gateway.url + "/mem0/v3/memories/",
        json={"filters": filters},
        headers={"Authorization": f"Token {ADMIN}"},
        timeout=30,
    )
    assert response.status_code == 400
    assert named in response.json()["detail"]


def test_a_bad_key_makes_the_client_raise(connect: Callable[[str], Any]) -> None:
    with pytest.raises(ValueError, match="admin key or a per-user gateway key"):
        connect("not-a-key")


def test_errors_are_mem0_shaped_and_clear(gateway: GatewayServer) -> None:
    with httpx.Client(
        base_url=gateway.url + "/mem0",
        headers={"Authorization": "Token gk-alice"},
        timeout=30,
    ) as http:
        missing = http.get("/v1/memories/nope/")
        assert (missing.status_code, missing.json()["error"]) == (404, "Memory not found!")
        bad = http.post("/v3/memories/add/", json={"messages": "hi", "timestamp": 1})
        assert (bad.status_code, bad.json()["detail"]) == (
            400,
            "not supported by this gateway: timestamp",
        )
        not_json = http.post("/v3/memories/search/", content=b"[1", timeout=30)
        assert not_json.status_code == 400
        assert "Traceback" not in not_json.text
        page = http.post("/v3/memories/", params={"page": 0}, json={})
        assert page.status_code == 400
        assert "page" in page.json()["detail"]


def test_the_paths_of_1x_clients_are_served(gateway: GatewayServer) -> None:
    with httpx.Client(
        base_url=gateway.url + "/mem0", headers={"Authorization": "Token gk-alice"}, timeout=30
    ) as http:
        added = http.post(
            "/v1/memories/",
            json={
                "messages": [{"role": "user", "content": "Drinks green tea"}],
                "user_id": "alice",
                "infer": False,
                "output_format": "v1.1",
            },
        )
        assert added.status_code == 200, added.text
        found = http.post("/v2/memories/search/", json={"query": "tea", "user_id": "alice"})
        assert [m["memory"] for m in found.json()["results"]] == ["Drinks green tea"]
        listed = http.post("/v2/memories/", json={"filters": {"user_id": "alice"}})
        assert listed.json()["count"] == 1
        erased = http.delete("/v1/entities/user/alice/")
        assert erased.status_code == 200, erased.text
        assert http.post("/v2/memories/", json={}).json()["count"] == 0
