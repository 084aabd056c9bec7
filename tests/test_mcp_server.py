"""Memory over MCP (gateway/mcp_server.py), driven by the `mcp` SDK's own
client over real HTTP: the caller's key decides whose memories a tool sees,
never a tool argument; what an agent stores reaches that user's chats."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.gateway_server import GatewayServer, gateway_config_for
from tests.upstream import ScriptedUpstream

KEYS = [{"key": "gk-alice", "user_id": "alice"}, {"key": "gk-bob", "user_id": "bob"}]
TOOLS = {
    "add_memory",
    "search_memories",
    "list_memories",
    "update_memory",
    "delete_memory",
    "forget_all",
}


@pytest.fixture
def start_mcp_gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> Callable[..., GatewayServer]:
    def start(memory: bool = True, **auth: Any) -> GatewayServer:
        config = gateway_config_for(
            upstream.url,
            tmp_path / "data",
            memory={} if memory else None,
            auth={"keys": KEYS, **auth},
        )
        return start_gateway(config)

    return start


@asynccontextmanager
async def mcp_session(gateway: GatewayServer, **headers: str) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(gateway.url + "/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    """The message of a tool call that must fail."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return " ".join(getattr(part, "text", "") for part in result.content)


async def test_the_tools_are_listed_and_none_takes_a_user(start_mcp_gateway) -> None:
    gateway = start_mcp_gateway()
    async with mcp_session(gateway, Authorization="Bearer gk-alice") as session:
        listed = (await session.list_tools()).tools
    assert {t.name for t in listed} == TOOLS
    for tool in listed:
        properties = set(tool.input_schema.get("properties", {}))
        assert not properties & {"user_id", "user", "agent_id"}, tool.name


async def test_a_per_user_key_sees_its_own_memories_and_nobody_elses(start_mcp_gateway) -> None:
    gateway = start_mcp_gateway()
    async with mcp_session(gateway, Authorization="Bearer gk-alice") as alice:
        added = await call(alice, "add_memory", text="Prefers window seats on trains")
        again = await call(alice, "add_memory", text="prefers window seats on trains.")
        assert again["id"] == added["id"]  # stored once
        found = await call(alice, "search_memories", query="which seat does she like?")
        assert [r["text"] for r in found["results"]] == ["Prefers window seats on trains"]
    async with mcp_session(gateway, Authorization="Bearer gk-bob") as bob:
        assert (await call(bob, "search_memories", query="window seats"))["results"] == []
        assert (await call(bob, "list_memories"))["memories"] == []
        assert "no memory with id" in await refused(
            bob, "update_memory", id=added["id"], text="Prefers aisle seats"
        )
        assert "no memory with id" in await refused(bob, "delete_memory", id=added["id"])
        # Naming alice in the identity header does not make a key hers.
        async with mcp_session(
            gateway, Authorization="Bearer gk-bob", **{"X-User-Id": "alice"}
        ) as spoofing:
            assert "only manage its own user" in await refused(
                spoofing, "search_memories", query="window"
            )
    async with mcp_session(gateway, Authorization="Bearer gk-alice") as alice:
        (memory,) = (await call(alice, "list_memories"))["memories"]
        assert memory["text"] == "Prefers window seats on trains"


async def test_update_delete_and_forget_all_act_on_the_callers_memories(start_mcp_gateway) -> None:
    gateway = start_mcp_gateway()
    async with mcp_session(gateway, Authorization="Bearer gk-alice") as alice:
        first = await call(alice, "add_memory", text="Lives in Lyon")
        await call(alice, "add_memory", text="Plays the cello")
        updated = await call(alice, "update_memory", id=first["id"], text="Lives in Marseille")
        assert (updated["id"], updated["text"]) == (first["id"], "Lives in Marseille")
        assert await call(alice, "delete_memory", id=first["id"]) == {"deleted": 1}
        texts = [m["text"] for m in (await call(alice, "list_memories"))["memories"]]
        assert texts == ["Plays the cello"]
        assert "confirm=true" in await refused(alice, "forget_all")
        assert len((await call(alice, "list_memories"))["memories"]) == 1
        assert await call(alice, "forget_all", confirm=True) == {"deleted": 1}
        assert (await call(alice, "list_memories"))["memories"] == []
        assert "between 1 and 100" in await refused(alice, "search_memories", query="x", limit=0)


async def test_a_memory_added_by_an_agent_is_injected_into_that_users_chat_only(
    start_mcp_gateway, upstream: ScriptedUpstream
) -> None:
    gateway = start_mcp_gateway()
    async with mcp_session(gateway, Authorization="Bearer gk-alice") as alice:
        await call(alice, "add_memory", text="Is allergic to peanuts")
    question = [{"role": "user", "content": "Suggest a snack. Any allergies I have?"}]
    for key in ("gk-alice", "gk-bob"):
        with gateway.client(api_key=key) as sdk:
            sdk.chat.completions.create(model="m", messages=question)  # type: ignore[arg-type]
    alice_sent, bob_sent = (r.body.decode() for r in upstream.requests[-2:])
    assert "allergic to peanuts" in alice_sent
    assert "allergic to peanuts" not in bob_sent


async def test_the_admin_key_acts_for_the_user_its_header_names(start_mcp_gateway) -> None:
    gateway = start_mcp_gateway(admin_key="adm-secret")
    admin = {"Authorization": "Bearer adm-secret"}
    async with mcp_session(gateway, **admin) as anonymous:
        assert "X-User-Id header" in await refused(anonymous, "list_memories")
    async with mcp_session(gateway, **admin, **{"X-User-Id": "carol"}) as carol:
        await call(carol, "add_memory", text="Speaks Portuguese")
    with httpx.Client(base_url=gateway.url, headers=admin, timeout=30) as http:
        listed = http.get("/v1/memories", params={"user_id": "carol"}).json()["data"]
    assert [m["text"] for m in listed] == ["Speaks Portuguese"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),  # an admin key is set: no local exception
        ({"Authorization": "Bearer not-a-key"}, 401),
        ({"Authorization": "Bearer gk-alice"}, 200),
    ],
)
def test_a_caller_without_a_key_gets_a_401_before_mcp_sees_the_call(
    start_mcp_gateway, headers: dict[str, str], status: int
) -> None:
    gateway = start_mcp_gateway(admin_key="adm-secret")
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }
    response = httpx.post(
        gateway.url + "/mcp",
        json=initialize,
        headers={**headers, "Accept": "application/json, text/event-stream"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    if status == 401:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_without_an_admin_key_a_page_under_a_foreign_name_is_refused(start_mcp_gateway) -> None:
    """DNS rebinding: a browser page reaches the loopback port under its own name."""
    gateway = start_mcp_gateway()
    response = httpx.post(
        gateway.url + "/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Host": "attacker.example", "Origin": "http://attacker.example"},
        timeout=30,
    )
    assert response.status_code == 401


def test_with_memory_off_there_is_no_mcp_endpoint(start_mcp_gateway) -> None:
    gateway = start_mcp_gateway(memory=False)
    response = httpx.post(gateway.url + "/mcp", json={}, timeout=30)
    assert response.status_code == 404
