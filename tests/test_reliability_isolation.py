"""Tenant isolation as a property: whatever users (hostile ids included), memory
ids and operations hypothesis picks, no user ever sees, receives by injection,
gets by id, updates, deletes or exports another user's memory.

One gateway for the whole test; a model of who owns which memory is kept beside
it and compared with what the management API says after every step.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import memory_settings
from tests.upstream import ScriptedUpstream

ADMIN = "sk-admin-isolation"
USER_KEYS = {"alice": "sk-gw-alice", "bob": "sk-gw-bob"}
USERS = [
    "alice",
    "bob",
    "Alice",
    "\u0430lice",  # Cyrillic a: looks like alice
    "alice ",
    "a' OR '1'='1",
    "'; DROP TABLE memories; --",
    'q"uote\\',
    "%",
    "_",
    "*",
    "x" * 256,  # the longest id allowed
    "用户",
]
OPS = ["add", "list", "get", "update", "delete", "history", "search", "export", "erase", "chat"]


class World:
    """The gateway and what it must hold: user -> {memory id: token}."""

    def __init__(self, gateway: GatewayServer, upstream: ScriptedUpstream) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.http = httpx.Client(base_url=gateway.url, timeout=60)
        self.owned: dict[str, dict[str, str]] = {u: {} for u in USERS}

    def as_(self, user: str, via_key: bool) -> tuple[dict[str, str], dict[str, str]]:
        """Headers and params acting for `user`: its own gateway key, or the admin key."""
        if via_key and user in USER_KEYS:
            return {"authorization": f"Bearer {USER_KEYS[user]}"}, {}
        return {"authorization": f"Bearer {ADMIN}"}, {"user_id": user}

    def foreign_tokens(self, user: str) -> set[str]:
        return {t for u, facts in self.owned.items() if u != user for t in facts.values()}

    def foreign_ids(self, user: str) -> set[str]:
        return {i for u, facts in self.owned.items() if u != user for i in facts}

    def check_everyone(self) -> None:
        for user, facts in self.owned.items():
            headers, params = self.as_(user, via_key=False)
            response = self.http.get("/v1/memories", params=params, headers=headers)
            assert response.status_code == 200, response.text
            listed = {m["id"]: m["text"] for m in response.json()["data"]}
            assert set(listed) == set(facts), user
            for memory_id, token in facts.items():
                assert token in listed[memory_id]


@pytest.fixture(scope="module")
def world(
    upstream_server: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    upstream_server.reset()
    data: Path = tmp_path_factory.mktemp("isolation") / "data"
    config = gateway_config_for(
        upstream_server.url,
        data,
        # Every stored memory of the caller is a search hit: injection shows all it may.
        memory=memory_settings(upstream_server.url, search={"min_score": -1.0, "limit": 50}),
        auth={
            "admin_key": ADMIN,
            "keys": [{"key": k, "user_id": u} for u, k in USER_KEYS.items()],
        },
    )
    gateway = GatewayServer(config, hooks=None).start()
    world = World(gateway, upstream_server)
    yield world
    world.http.close()
    gateway.stop()
    upstream_server.reset()


def step(world: World, op: str, actor: str, victim: str, via_key: bool) -> None:
    http = world.http
    headers, params = world.as_(actor, via_key)
    owned = world.owned[actor]
    victim_ids = sorted(world.owned[victim]) if victim != actor else []
    target = victim_ids[0] if victim_ids else "mem-" + uuid.uuid4().hex

    if op == "add":
        token = "tok-" + uuid.uuid4().hex[:12]
        body = {"text": f"note {token}", "infer": False, **params}
        response = http.post("/v1/memories", json=body, headers=headers)
        assert response.status_code == 201, response.text
        [memory] = response.json()["results"]
        assert memory["user_id"] == actor
        owned[memory["id"]] = token
    elif op == "list":
        response = http.get("/v1/memories", params=params, headers=headers)
        assert {m["id"] for m in response.json()["data"]} == set(owned)
    elif op in ("get", "history"):
        path = f"/v1/memories/{target}" + ("/history" if op == "history" else "")
        response = http.get(path, params=params, headers=headers)
        assert response.status_code == 404, response.text
        assert not world.foreign_tokens(actor) & set(response.text.split())
    elif op == "update":
        response = http.put(
            f"/v1/memories/{target}", params=params, headers=headers, json={"text": "pwned"}
        )
        assert response.status_code == 404, response.text
    elif op == "delete":
        response = http.delete(f"/v1/memories/{target}", params=params, headers=headers)
        assert response.status_code == 404, response.text
    elif op == "search":
        query = world.owned[victim].get(target, "note")
        body = {"query": query, **params}
        response = http.post("/v1/memories/search", json=body, headers=headers)
        assert response.status_code == 200, response.text
        found = {r["memory"]["id"] for r in response.json()["results"]}
        assert found <= set(owned)
    elif op == "export":
        response = http.get("/v1/memories/export", params=params, headers=headers)
        assert response.status_code == 200, response.text
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        exported = {line["id"] for line in lines if "id" in line}
        assert exported <= set(owned)
        assert not {t for t in world.foreign_tokens(actor) if t in response.text}
    elif op == "erase":
        response = http.delete("/v1/memories", params=params, headers=headers)
        assert response.status_code == 200, response.text
        owned.clear()
    elif op == "chat":
        marker = uuid.uuid4().hex
        question = f"{marker} what about {world.owned[victim].get(target, 'note')}?"
        response = http.post(
            "/v1/chat/completions",
            json={"model": "m", "user": actor, "messages": [{"role": "user", "content": question}]},
            headers={"X-Memory-Mode": "read", "authorization": "Bearer sk-client"},
        )
        assert response.status_code == 200, response.text
        [sent] = [
            r
            for r in world.upstream.requests
            if r.path.endswith("/chat/completions") and marker in r.body.decode(errors="replace")
        ]
        injected = [
            m["content"]
            for m in sent.json["messages"]
            if m.get("role") == "system" and m.get("content") != question
        ]
        text = "\n".join(injected)
        assert not {t for t in world.foreign_tokens(actor) if t in text}
        assert not {
            i for i in world.foreign_ids(actor) if i in response.headers.get("X-Memory-Ids", "")
        }
        # The caller's own memories are found (min_score -1): injection does work.
        if owned:
            assert response.headers["X-Memory-Injected"] != "0"


users = st.sampled_from(USERS)


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(OPS), users, users, st.booleans()), min_size=1, max_size=10
    )
)
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_user_ever_reaches_another_users_memory(
    world: World, steps: list[tuple[str, str, str, bool]]
) -> None:
    for op, actor, victim, via_key in steps:
        step(world, op, actor, victim, via_key)
    world.check_everyone()


def test_a_per_user_key_cannot_name_another_user(world: World) -> None:
    alice = {"authorization": f"Bearer {USER_KEYS['alice']}"}
    for method, path in [("GET", "/v1/memories"), ("GET", "/v1/memories/export")]:
        response = world.http.request(method, path, params={"user_id": "bob"}, headers=alice)
        assert response.status_code == 403
    response = world.http.post(
        "/v1/memories", json={"user_id": "bob", "text": "x", "infer": False}, headers=alice
    )
    assert response.status_code == 403
    assert world.http.get("/v1/memories/users", headers=alice).status_code == 403
