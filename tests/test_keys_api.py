"""Keys issued at run time (gateway/keys_api.py, gateway/key_store.py): shown
once, stored hashed, working on every API and every worker within a second
of creation, refused within a second of revocation or at expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway import key_store
from gateway.key_store import FILE, KeyStore
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.postgres import PASSWORD, PostgresServer
from tests.upstream import ScriptedUpstream

ADMIN = {"Authorization": "Bearer adm-secret"}
SECRET = "an operator secret from the environment"


@pytest.fixture
def start_keyed_gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> Callable[..., GatewayServer]:
    def start(
        memory: dict[str, Any] | None = None,
        *,
        data: str = "data",
        shared: dict[str, Any] | None = None,
        **auth: Any,
    ) -> GatewayServer:
        """`shared`: the sections replicas share (`queue`)."""
        upstreams = [
            {"name": "scripted", "base_url": upstream.url, "default": True},
            {"name": "claude", "base_url": upstream.url, "api": "anthropic", "models": ["c*"]},
        ]
        config = gateway_config_for(
            upstream.url,
            tmp_path / data,
            upstreams=upstreams,
            memory=memory,
            auth={"admin_key": "adm-secret", "keys_secret": SECRET, **auth},
            **(shared or {}),
        )
        return start_gateway(config)

    return start


@pytest.fixture
def admin(start_keyed_gateway: Callable[..., GatewayServer]) -> Iterator[httpx.Client]:
    gateway = start_keyed_gateway()
    with httpx.Client(base_url=gateway.url, headers=ADMIN, timeout=30) as http:
        http.gateway = gateway  # type: ignore[attr-defined]
        yield http


def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("not within the deadline")
        time.sleep(0.02)


def chat(gateway: GatewayServer, key: str) -> openai.types.chat.ChatCompletion:
    with gateway.client(api_key=key) as sdk:
        return sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


def test_an_issued_key_is_shown_once_and_names_its_user_on_every_api(
    start_keyed_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    gateway = start_keyed_gateway(memory={})
    admin = httpx.Client(base_url=gateway.url, headers=ADMIN, timeout=30)
    created = admin.post("/v1/keys", json={"user_id": "alice", "name": "laptop"})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert key.startswith("mgk-") and created.json()["hint"] == key[-4:]

    chat(gateway, key)
    assert upstream.requests[-1].headers.get("authorization") is None  # never leaves
    with gateway.client(api_key=key) as sdk:
        sdk.responses.create(model="m", input="hi")
    claude = anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0)
    claude.messages.create(model="c1", max_tokens=9, messages=[{"role": "user", "content": "hi"}])
    assert key not in str(upstream.requests[-1].headers)
    mine = httpx.get(gateway.url + "/v1/memories", headers={"Authorization": f"Bearer {key}"})
    assert mine.status_code == 200  # the memory API knows it as alice's key
    assert (
        httpx.get(
            gateway.url + "/v1/memories",
            params={"user_id": "bob"},
            headers={"Authorization": f"Bearer {key}"},
        ).status_code
        == 403
    )

    listed = admin.get("/v1/keys", params={"user_id": "alice"}).json()["data"]
    assert [(k["name"], k["hint"]) for k in listed] == [("laptop", key[-4:])]
    assert "key" not in listed[0]
    stored = (tmp_path / "data" / FILE).read_bytes()
    assert key.encode() not in stored and key[4:].encode() not in stored
    admin.close()


def test_a_revoked_key_gets_401_on_its_next_request_and_is_never_passed_upstream(
    admin: httpx.Client, upstream: ScriptedUpstream
) -> None:
    gateway: GatewayServer = admin.gateway  # type: ignore[attr-defined]
    created = admin.post("/v1/keys", json={"user_id": "alice"}).json()
    chat(gateway, created["key"])
    assert admin.delete(f"/v1/keys/{created['id']}").json() == {"deleted": 1}
    asked = len(upstream.requests)
    with pytest.raises(openai.AuthenticationError) as raised:
        chat(gateway, created["key"])
    assert "revoked or expired" in str(raised.value)
    assert len(upstream.requests) == asked
    assert admin.delete(f"/v1/keys/{created['id']}").status_code == 404


def test_an_expired_key_is_refused(admin: httpx.Client) -> None:
    gateway: GatewayServer = admin.gateway  # type: ignore[attr-defined]
    soon = datetime.now(UTC) + timedelta(seconds=1)
    created = admin.post("/v1/keys", json={"user_id": "alice", "expires_at": soon.isoformat()})
    key = created.json()["key"]
    chat(gateway, key)

    def refused() -> bool:
        try:
            chat(gateway, key)
        except openai.AuthenticationError:
            return True
        return False

    until(refused)
    past = datetime.now(UTC) - timedelta(seconds=1)
    late = admin.post("/v1/keys", json={"user_id": "alice", "expires_at": past.isoformat()})
    assert late.status_code == 400 and late.json()["error"]["param"] == "expires_at"


def test_an_upstream_key_is_stored_encrypted_and_sent_for_its_user(
    admin: httpx.Client, upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    gateway: GatewayServer = admin.gateway  # type: ignore[attr-defined]
    created = admin.post(
        "/v1/keys", json={"user_id": "alice", "upstream_api_key": "sk-alices-own-openai-key"}
    ).json()
    assert created["has_upstream_key"] is True
    chat(gateway, created["key"])
    assert upstream.requests[-1].headers["authorization"] == "Bearer sk-alices-own-openai-key"
    assert b"sk-alices-own-openai-key" not in (tmp_path / "data" / FILE).read_bytes()


def test_without_a_keys_secret_an_upstream_key_is_refused(
    start_keyed_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = start_keyed_gateway(keys_secret=None)
    response = httpx.post(
        gateway.url + "/v1/keys",
        headers=ADMIN,
        json={"user_id": "alice", "upstream_api_key": "sk-x"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "keys_secret_missing"


def test_only_the_admin_manages_keys(admin: httpx.Client) -> None:
    gateway: GatewayServer = admin.gateway  # type: ignore[attr-defined]
    key = admin.post("/v1/keys", json={"user_id": "alice"}).json()["key"]
    as_user = {"Authorization": f"Bearer {key}"}
    assert httpx.get(gateway.url + "/v1/keys", headers=as_user).status_code == 403
    assert (
        httpx.post(gateway.url + "/v1/keys", headers=as_user, json={"user_id": "bob"}).status_code
        == 403
    )
    anonymous = httpx.get(gateway.url + "/v1/keys")  # an admin key is set: no local exception
    assert anonymous.status_code == 401
    bad = admin.post("/v1/keys", json={"user_id": "x" * 300})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "user_id"
    extra = admin.post("/v1/keys", json={"user_id": "a", "scopes": ["all"]})
    assert extra.status_code == 400


def test_a_key_issued_through_one_process_works_in_another_within_a_second(
    start_keyed_gateway: Callable[..., GatewayServer],
) -> None:
    """Two gateways on one data directory, as `server.workers` runs them."""
    first, second = start_keyed_gateway(), start_keyed_gateway()
    created = httpx.post(first.url + "/v1/keys", headers=ADMIN, json={"user_id": "alice"}).json()

    def works(gateway: GatewayServer) -> bool:
        """Known as alice's key: a 403 on the admin's list, not a stranger's 401."""
        headers = {"Authorization": f"Bearer {created['key']}"}
        return httpx.get(gateway.url + "/v1/keys", headers=headers).status_code == 403

    started = time.monotonic()
    until(lambda: works(second), timeout=5)
    assert time.monotonic() - started < 1.5
    httpx.delete(first.url + f"/v1/keys/{created['id']}", headers=ADMIN)
    until(lambda: not works(second), timeout=5)


def test_replicas_sharing_a_postgresql_queue_share_their_issued_keys(
    start_keyed_gateway: Callable[..., GatewayServer],
    postgres_server: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two gateways on two machines (data directories of their own): a key
    issued on one works on the other within a second, and stops when revoked."""
    shared = {"queue": {"url": postgres_server.create_database()}}
    first = start_keyed_gateway(data="replica-1", shared=shared)
    second = start_keyed_gateway(data="replica-2", shared=shared)
    created = httpx.post(first.url + "/v1/keys", headers=ADMIN, json={"user_id": "alice"}).json()
    headers = {"Authorization": f"Bearer {created['key']}"}

    def works(gateway: GatewayServer) -> bool:
        return httpx.get(gateway.url + "/v1/keys", headers=headers).status_code == 403

    started = time.monotonic()
    until(lambda: works(second), timeout=5)
    assert time.monotonic() - started < 1.5
    listed = httpx.get(second.url + "/v1/keys", headers=ADMIN).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    httpx.delete(second.url + f"/v1/keys/{created['id']}", headers=ADMIN)
    until(lambda: not works(first), timeout=5)
    # Nothing of the keys in the replicas' own directories.
    assert not (first.config.data_path / FILE).exists()
    assert PASSWORD not in caplog.text


def test_a_revoked_key_from_a_local_client_is_not_taken_for_the_local_admin(
    start_keyed_gateway: Callable[..., GatewayServer],
) -> None:
    gateway = start_keyed_gateway(admin_key=None)
    created = httpx.post(gateway.url + "/v1/keys", json={"user_id": "alice"}).json()
    httpx.delete(gateway.url + f"/v1/keys/{created['id']}")
    headers = {"Authorization": f"Bearer {created['key']}"}
    response = httpx.get(gateway.url + "/v1/keys", headers=headers)
    assert response.status_code == 401
    assert "revoked or expired" in response.json()["error"]["message"]


async def test_an_unreachable_key_database_is_said_once_not_twice_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(key_store, "REFRESH_SECONDS", 0.01)
    store = KeyStore(tmp_path, queue_url="postgresql://gw:pw-3b9e@127.0.0.1:1/keys")
    tries = 0
    version = store._table.version

    def counted() -> object | None:
        nonlocal tries
        tries += 1
        return version()

    store._table.version = counted  # type: ignore[method-assign]
    await store.start()
    try:
        while tries < 10:
            await asyncio.sleep(0.01)
    finally:
        await store.close()
    assert caplog.text.count("issued keys cannot be read") == 1
    assert caplog.text.count("could not re-read the issued keys") == 1
    assert "pw-3b9e" not in caplog.text
