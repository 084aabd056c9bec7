"""Who the gateway attributes a request to, and which key it sends upstream."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.config import UserKey
from gateway.errors import GatewayError
from gateway.identity import KeyMatcher, KeyRing, bearer_token, scope_for
from memory.models import Scope
from tests.gateway_server import gateway_config_for
from tests.recording import RecordingHooks

MESSAGES = [{"role": "user", "content": "hi"}]
KEYS = [
    {"key": "gk-alice", "user_id": "alice", "upstream_api_key": "sk-alice-upstream"},
    {"key": "gk-bob", "user_id": "bob"},
]


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


def _gateway(
    start_gateway, upstream, tmp_path, hooks, *, auth=None, upstream_key=None, identity=None
):
    sections = {"auth": auth or {"keys": KEYS}}
    if identity:
        sections["identity"] = identity
    config = gateway_config_for(upstream.url, tmp_path, **sections)
    if upstream_key:
        config.upstreams[0].api_key = upstream_key
    return start_gateway(config, hooks=hooks)


def _chat(gw, api_key="sk-client", **kwargs):
    with gw.client(api_key=api_key, default_headers=kwargs.pop("headers", None)) as sdk:
        return sdk.chat.completions.create(model="m", messages=MESSAGES, **kwargs)


def test_a_per_user_key_names_the_user_and_maps_to_its_upstream_key(
    start_gateway, upstream, tmp_path, hooks
):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks, upstream_key="sk-shared")
    _chat(gw, api_key="gk-alice")
    ident = hooks.contexts[-1].identity
    assert (ident.user_id, ident.via) == ("alice", "key")
    assert hooks.contexts[-1].upstream_api_key == "sk-alice-upstream"
    assert upstream.last().headers["authorization"] == "Bearer sk-alice-upstream"


def test_a_per_user_key_without_its_own_upstream_key_uses_the_upstreams(
    start_gateway, upstream, tmp_path, hooks
):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks, upstream_key="sk-shared")
    _chat(gw, api_key="gk-bob")
    assert hooks.contexts[-1].identity.user_id == "bob"
    assert upstream.last().headers["authorization"] == "Bearer sk-shared"


def test_a_gateway_key_never_reaches_the_upstream(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    _chat(gw, api_key="gk-bob")
    assert "authorization" not in upstream.last().headers
    # Passthrough paths too.
    httpx.get(gw.base_url + "/models", headers={"authorization": "Bearer gk-bob"})
    assert "authorization" not in upstream.last().headers


def test_bring_your_own_key_passes_through(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    _chat(gw, api_key="sk-my-own")
    assert upstream.last().headers["authorization"] == "Bearer sk-my-own"
    assert hooks.contexts[-1].upstream_api_key == "sk-my-own"
    assert hooks.contexts[-1].identity.user_id is None


def test_a_configured_upstream_key_replaces_the_clients(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks, upstream_key="sk-operator")
    _chat(gw, api_key="sk-my-own")
    assert upstream.last().headers["authorization"] == "Bearer sk-operator"


def test_require_key_rejects_unknown_keys_with_401(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(
        start_gateway, upstream, tmp_path, hooks, auth={"require_key": True, "keys": KEYS}
    )
    with pytest.raises(openai.AuthenticationError) as raised:
        _chat(gw, api_key="sk-unknown")
    assert raised.value.body["code"] == "invalid_api_key"
    response = httpx.get(gw.base_url + "/models")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert upstream.requests == []
    assert _chat(gw, api_key="gk-alice").choices[0].message.content == "echo: hi"
    # Health stays open to the orchestrator.
    assert httpx.get(gw.url + "/health").status_code == 200


def test_header_identity_with_agent_and_session(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    _chat(
        gw,
        headers={"X-User-Id": "carol", "X-Agent-Id": "tutor", "X-Session-Id": "s-1"},
        user="ignored",
    )
    ident = hooks.contexts[-1].identity
    assert (ident.user_id, ident.agent_id, ident.session_id, ident.via) == (
        "carol",
        "tutor",
        "s-1",
        "header",
    )
    # The gateway's own headers are not sent to the provider; the body is untouched.
    sent = upstream.last()
    assert "x-user-id" not in sent.headers and "x-agent-id" not in sent.headers
    assert sent.json["user"] == "ignored"


def test_the_header_name_is_configurable(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks, identity={"user_header": "X-Customer"})
    _chat(gw, headers={"X-Customer": "dave", "X-User-Id": "not-me"})
    assert hooks.contexts[-1].identity.user_id == "dave"


def test_several_user_headers_are_tried_in_order_and_none_reaches_the_upstream(
    start_gateway, upstream, tmp_path, hooks
):
    """As set up for Open WebUI: its header first, the gateway's own after."""
    identity = {"user_header": ["X-OpenWebUI-User-Id", "X-User-Id"]}
    gw = _gateway(start_gateway, upstream, tmp_path, hooks, identity=identity)
    _chat(gw, headers={"X-User-Id": "fallback", "X-OpenWebUI-User-Id": "webui-7"})
    assert hooks.contexts[-1].identity.user_id == "webui-7"
    _chat(gw, headers={"X-User-Id": "fallback"})
    assert hooks.contexts[-1].identity.user_id == "fallback"
    sent = {name.lower() for r in upstream.requests for name in r.headers}
    assert not sent & {"x-openwebui-user-id", "x-user-id"}


def test_body_user_field_identity(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    _chat(gw, user="erin")
    ident = hooks.contexts[-1].identity
    assert (ident.user_id, ident.via) == ("erin", "body")


def test_body_user_field_can_be_switched_off(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks, identity={"body_user_field": False})
    _chat(gw, user="erin")
    assert hooks.contexts[-1].identity.user_id is None


def test_a_key_wins_over_header_and_body(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    _chat(gw, api_key="gk-alice", headers={"X-User-Id": "mallory"}, user="mallory")
    assert hooks.contexts[-1].identity.user_id == "alice"


@pytest.mark.parametrize(
    ("where", "value", "reason"),
    [
        ("header", "u" * 257, "longer than 256"),
        ("header", "a\tb", "control characters"),
        ("body", "a\nb", "control characters"),
        ("body", "x" * 300, "longer than 256"),
        ("agent", "a" * 257, "agent_id is longer than 256"),
    ],
)
def test_invalid_ids_are_400_saying_why(
    start_gateway, upstream, tmp_path, hooks, where, value, reason
):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    body = {"model": "m", "messages": MESSAGES}
    headers = {}
    if where == "header":
        headers["X-User-Id"] = value
    elif where == "agent":
        headers["X-Agent-Id"] = value
    else:
        body["user"] = value
    response = httpx.post(gw.base_url + "/chat/completions", json=body, headers=headers)
    assert response.status_code == 400
    assert reason in response.json()["error"]["message"]
    assert upstream.requests == []


@pytest.mark.parametrize("value", [123, ["erin"], {"id": "erin"}, True])
def test_a_body_user_that_is_not_a_string_is_400_naming_the_param(
    start_gateway, upstream, tmp_path, hooks, value
):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    body = {"model": "m", "messages": MESSAGES, "user": value}
    response = httpx.post(gw.base_url + "/chat/completions", json=body)
    assert response.status_code == 400
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("user", "invalid_type")
    assert "'user'" in error["message"] and "string" in error["message"]
    assert upstream.requests == []


def test_a_null_body_user_names_nobody(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    _chat(gw, extra_body={"user": None})
    assert hooks.contexts[-1].identity.user_id is None


def test_the_body_user_is_not_checked_when_a_header_names_the_user(
    start_gateway, upstream, tmp_path, hooks
):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    body = {"model": "m", "messages": MESSAGES, "user": 123}
    response = httpx.post(gw.base_url + "/chat/completions", json=body, headers={"X-User-Id": "a"})
    assert response.status_code == 200
    assert hooks.contexts[-1].identity.user_id == "a"
    # The body goes upstream as sent: the provider judges its own fields.
    assert upstream.last().json["user"] == 123


def test_the_body_user_is_not_checked_when_the_body_user_field_is_off(
    start_gateway, upstream, tmp_path, hooks
):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks, identity={"body_user_field": False})
    body = {"model": "m", "messages": MESSAGES, "user": 123}
    assert httpx.post(gw.base_url + "/chat/completions", json=body).status_code == 200
    assert hooks.contexts[-1].identity.user_id is None


def test_a_256_character_id_is_accepted(start_gateway, upstream, tmp_path, hooks):
    gw = _gateway(start_gateway, upstream, tmp_path, hooks)
    _chat(gw, headers={"X-User-Id": "u" * 256})
    assert hooks.contexts[-1].identity.user_id == "u" * 256


def test_key_ring_matches_only_exact_keys():
    ring = KeyRing([UserKey(key="gk-one", user_id="one"), UserKey(key="gk-two", user_id="two")])
    assert ring.match("gk-two").user_id == "two"
    assert ring.match("gk-tw") is None
    assert ring.match("gk-two ") is None
    assert ring.match(None) is None
    assert bearer_token("Bearer gk-two") == "gk-two"
    assert bearer_token("bearer gk-two") == "gk-two"
    assert bearer_token("Basic abc") is None


def test_identity_repr_hides_keys():
    from litestar.datastructures import Headers

    from gateway.hooks import ChatContext
    from gateway.identity import Identity

    ident = Identity(user_id="u", key=UserKey(key="gk-secret", user_id="u"))
    assert "secret" not in repr(ident)
    ctx = ChatContext(identity=ident, request_headers=Headers({}), stream=False)
    ctx.upstream_api_key = "sk-secret"
    assert "secret" not in repr(ctx)


def test_key_matcher_returns_the_value_of_the_matching_key():
    matcher = KeyMatcher([("admin-key", "admin"), ("other", "other")])
    assert matcher.match("admin-key") == "admin"
    assert matcher.match("admin-ke") is None
    assert matcher.match(None) is None
    assert not KeyMatcher([]) and KeyMatcher([]).match("x") is None


def test_one_scope_rule_for_chat_and_management():
    assert scope_for("u", "a", "s") == Scope(user_id="u", agent_id="a", session_id="s")
    # A per-user key binds its user; naming it again is fine, naming another is not.
    assert scope_for(None, key_user="u") == Scope(user_id="u")
    assert scope_for("u", "a", key_user="u") == Scope(user_id="u", agent_id="a")
    with pytest.raises(GatewayError) as denied:
        scope_for("v", key_user="u")
    assert (denied.value.status, denied.value.param) == (403, "user_id")
    with pytest.raises(GatewayError) as missing:
        scope_for(None)
    assert (missing.value.status, missing.value.code) == (400, "missing_user_id")
    with pytest.raises(GatewayError) as invalid:
        scope_for("bad id\n")
    assert (invalid.value.status, invalid.value.code) == (400, "invalid_id")
