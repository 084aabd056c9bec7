"""The console's sessions (gateway/console/session.py) without a server:
what signs them, what a cookie holds, and when one stops being valid."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest

from gateway.config import AuthConfig
from gateway.console.session import LoginRefused, Sessions, signing_secret
from gateway.identity import KeyRing
from gateway.key_store import KeyStore
from gateway.memories_access import Access

ADMIN = "adm-session-test"
BOB_KEY = "gk-bob-config"


def auth(**raw: object) -> AuthConfig:
    return msgspec.convert(raw, AuthConfig)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[KeyStore]:
    keys = KeyStore(tmp_path)
    yield keys
    await keys.close()


def sessions_for(config: AuthConfig, store: KeyStore) -> Sessions:
    return Sessions(config, Access(config.admin_key, KeyRing(config.keys, store)), store)


def test_the_signing_secret_comes_from_shared_configuration() -> None:
    assert signing_secret(auth()) is None
    admin = signing_secret(auth(admin_key=ADMIN))
    assert admin is not None and len(admin) == 32
    assert admin == signing_secret(auth(admin_key=ADMIN, keys_secret="other"))
    assert admin != signing_secret(auth(admin_key=ADMIN + "x"))
    assert signing_secret(auth(keys_secret="k")) not in (None, admin)
    from_keys = signing_secret(auth(keys=[{"key": BOB_KEY, "user_id": "bob"}]))
    assert from_keys is not None and from_keys != admin
    assert ADMIN.encode() not in admin


async def test_an_admin_session_round_trips_and_holds_no_key(store: KeyStore) -> None:
    sessions = sessions_for(auth(admin_key=ADMIN), store)
    session, cookie = await sessions.login(ADMIN)
    assert session.user_id is None and ADMIN not in cookie
    assert await sessions.verify(cookie) == session
    # Another worker process with the same configuration accepts it.
    assert await sessions_for(auth(admin_key=ADMIN), store).verify(cookie) == session
    # A changed admin key ends it.
    assert await sessions_for(auth(admin_key="new-admin"), store).verify(cookie) is None


async def test_a_tampered_or_expired_cookie_is_refused(store: KeyStore) -> None:
    config = auth(admin_key=ADMIN, keys=[{"key": BOB_KEY, "user_id": "bob"}])
    sessions = sessions_for(config, store)
    session, cookie = await sessions.login(BOB_KEY)
    assert session.user_id == "bob"
    version, payload, mac = cookie.split(".")
    forged = sessions.encode(replace(session, user_id=None)).split(".")[1]
    assert await sessions.verify(f"{version}.{forged}.{mac}") is None
    # The first character: it carries six bits of the MAC (the last carries
    # only four, so some replacements of it decode to the same bytes).
    tampered = ("B" if mac[0] == "A" else "A") + mac[1:]
    assert await sessions.verify(f"{version}.{payload}.{tampered}") is None
    assert await sessions.verify("garbage") is None
    assert await sessions.verify("") is None
    expired = sessions.encode(replace(session, expires_at=int(time.time()) - 1))
    assert await sessions.verify(expired) is None


async def test_a_gateway_yaml_key_removed_from_the_configuration_ends_its_session(
    store: KeyStore,
) -> None:
    with_bob = auth(admin_key=ADMIN, keys=[{"key": BOB_KEY, "user_id": "bob"}])
    _, cookie = await sessions_for(with_bob, store).login(BOB_KEY)
    assert await sessions_for(with_bob, store).verify(cookie) is not None
    without = auth(admin_key=ADMIN, keys=[{"key": "gk-someone-else", "user_id": "bob"}])
    assert await sessions_for(without, store).verify(cookie) is None


async def test_a_revoked_or_expired_issued_key_ends_its_session(store: KeyStore) -> None:
    sessions = sessions_for(auth(admin_key=ADMIN), store)
    issued, token = await store.create("carol")
    session, cookie = await sessions.login(token)
    assert session.user_id == "carol" and session.key_ids == (issued.id,)
    assert token not in cookie
    assert await sessions.verify(cookie) == session
    await store.revoke(issued.id)
    assert await sessions.verify(cookie) is None
    with pytest.raises(LoginRefused):
        await sessions.login(token)

    soon = time.time() + 60
    issued, token = await store.create("carol", expires_at=soon)
    session, _ = await sessions.login(token)
    assert session.expires_at == int(soon)  # not past the key's own expiry


async def test_csrf_tokens_are_per_session(store: KeyStore) -> None:
    sessions = sessions_for(auth(admin_key=ADMIN), store)
    first, _ = await sessions.login(ADMIN)
    second, _ = await sessions.login(ADMIN)
    assert sessions.csrf_token(first) == sessions.csrf_token(first)
    assert sessions.csrf_token(first) != sessions.csrf_token(second)
    assert first.nonce not in sessions.csrf_token(first)


async def test_no_login_without_a_secret_or_with_a_wrong_key(store: KeyStore) -> None:
    with pytest.raises(LoginRefused, match=r"needs auth\.admin_key"):
        await sessions_for(auth(), store).login("anything")
    with pytest.raises(LoginRefused, match="neither the admin key"):
        await sessions_for(auth(admin_key=ADMIN), store).login("mgk-not-issued")
