"""Requests the gateway cannot parse get OpenAI-shaped errors that say which
field is wrong and why, never a bare "Validation failed".

The management API (`/v1/memories`) is parsed by Litestar; its validation
errors must read like OpenAI's own: `param` is the field path the client
sent, `code` what kind of mistake it is, `message` names the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import memory_settings
from tests.upstream import ScriptedUpstream


@pytest.fixture
def admin(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> Iterator[httpx.Client]:
    """The management API of a memory gateway, as a loopback client (admin)."""
    config = gateway_config_for(
        upstream.url, tmp_path / "data", memory=memory_settings(upstream.url)
    )
    gateway = start_gateway(config)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        yield http


def openai_error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    """The error object of an OpenAI-shaped error response; checks the shape on the way."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-should-retry"] == "false"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert "Validation failed" not in error["message"]
    return error


def test_a_body_field_of_the_wrong_type_is_named_in_param_and_message(
    admin: httpx.Client,
) -> None:
    error = openai_error(admin.post("/v1/memories", json={"user_id": "alice", "text": 5}))
    assert (error["param"], error["code"]) == ("text", "invalid_type")
    assert "'text'" in error["message"]
    assert "int" in error["message"]


def test_a_query_parameter_of_the_wrong_type_is_named(admin: httpx.Client) -> None:
    error = openai_error(admin.get("/v1/memories", params={"user_id": "alice", "limit": "abc"}))
    assert (error["param"], error["code"]) == ("limit", "invalid_type")
    assert "'limit'" in error["message"]


def test_a_value_out_of_range_is_an_invalid_value_saying_the_bound(admin: httpx.Client) -> None:
    error = openai_error(admin.get("/v1/memories", params={"user_id": "alice", "limit": "0"}))
    assert (error["param"], error["code"]) == ("limit", "invalid_value")
    assert ">= 1" in error["message"]


def test_param_is_the_name_the_client_sent_not_the_handlers_argument(
    admin: httpx.Client,
) -> None:
    # The handler's argument is `job_state`; the query parameter is `state`.
    error = openai_error(admin.get("/v1/memories/jobs", params={"state": "nope"}))
    assert (error["param"], error["code"]) == ("state", "invalid_value")
    assert "'state'" in error["message"] and "nope" in error["message"]


def test_a_nested_field_gets_its_path_in_param(admin: httpx.Client) -> None:
    error = openai_error(admin.post("/v1/memories", json={"user_id": "alice", "messages": [5]}))
    assert (error["param"], error["code"]) == ("messages[0]", "invalid_type")
    assert "'messages[0]'" in error["message"]


def test_an_unknown_field_is_named(admin: httpx.Client) -> None:
    error = openai_error(admin.post("/v1/memories", json={"user_id": "alice", "txet": "hi"}))
    assert (error["param"], error["code"]) == ("txet", "unknown_parameter")
    assert "'txet'" in error["message"]


def test_a_missing_required_field_is_named(admin: httpx.Client) -> None:
    error = openai_error(admin.post("/v1/memories/search", json={"user_id": "alice"}))
    assert (error["param"], error["code"]) == ("query", "missing_required_parameter")
    assert "'query'" in error["message"]


def test_every_wrong_parameter_is_reported_the_first_in_param(admin: httpx.Client) -> None:
    response = admin.get("/v1/memories", params={"user_id": "alice", "limit": "x", "offset": "y"})
    error = openai_error(response)
    assert error["param"] in ("limit", "offset")
    assert "'limit'" in error["message"] and "'offset'" in error["message"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"text": "caf\xff"}', b"[" * 10_000],
    ids=["syntax", "invalid-utf8", "deep-nesting"],
)
def test_a_body_that_is_not_json_is_invalid_json_as_on_the_chat_path(
    admin: httpx.Client, body: bytes
) -> None:
    response = admin.post(
        "/v1/memories", content=body, headers={"content-type": "application/json"}
    )
    error = openai_error(response)
    assert (error["param"], error["code"]) == (None, "invalid_json")
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b""], ids=["array", "string", "empty"])
def test_a_body_that_is_not_an_object_is_invalid_json(admin: httpx.Client, body: bytes) -> None:
    response = admin.post(
        "/v1/memories", content=body, headers={"content-type": "application/json"}
    )
    error = openai_error(response)
    assert (error["param"], error["code"]) == (None, "invalid_json")
    assert "JSON object" in error["message"]
