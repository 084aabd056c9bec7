"""Hostile input: every bad request gets a clean 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import memory_settings
from tests.upstream import JSONReply, ScriptedUpstream


@pytest.fixture
def gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> GatewayServer:
    config = gateway_config_for(
        upstream.url,
        tmp_path / "data",
        memory=memory_settings(upstream.url),
        server={"max_body_bytes": 8 * 1024 * 1024},
    )
    return start_gateway(config)


@pytest.fixture
def http(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def assert_openai_4xx(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]


CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"null",
        b"[1, 2]",
        b'"a string"',
        b'{"model": "m", "messages": "hi"}',
        b'{"model": "m", "messages": {"role": "user"}}',
        b'{"model": "m", "messages": 5}',
        b"\xff\xfe\x00garbage",
        b'{"model": "m", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    ],
    ids=[
        "broken",
        "empty",
        "null",
        "array",
        "string",
        "messages-str",
        "messages-obj",
        "messages-int",
        "binary",
        "invalid-utf8",
        "deep-array",
        "deep-object",
    ],
)
def test_malformed_chat_bodies_are_400(http: httpx.Client, body: bytes) -> None:
    response = http.post(CHAT, content=body, headers={**JSON, "X-User-Id": "u"})
    assert_openai_4xx(response)
    assert response.status_code == 400


def test_wrong_types_inside_messages_never_crash_the_gateway(
    http: httpx.Client, upstream: ScriptedUpstream
) -> None:
    rejected = {"error": {"message": "bad messages", "type": "invalid_request_error"}}
    for messages in (
        [None],
        [1, "two", 3.0],
        [{"role": 5, "content": {"x": 1}}],
        [{"role": "user", "content": [{"type": "text", "text": 7}, None]}],
        [{"role": "user"}],
    ):
        # The upstream judges messages; the gateway (memory lookup included) must
        # hand them on and relay the verdict, not crash on them.
        upstream.push(JSONReply(rejected, status=400))
        response = http.post(
            CHAT, json={"model": "m", "messages": messages}, headers={"X-User-Id": "u"}
        )
        assert response.status_code == 400 and response.json() == rejected, response.text


def test_a_50_mib_body_is_413_without_being_read_whole(http: httpx.Client) -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"a" * (50 << 20) + b'"}]}'
    response = http.post(CHAT, content=body, headers=JSON)
    assert response.status_code == 413
    assert_openai_4xx(response)
    # And the process is fine afterwards.
    assert http.get("/health").status_code == 200


def test_huge_and_repeated_headers_are_refused_or_ignored_not_500(
    gateway: GatewayServer,
) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        big = http.post(
            CHAT,
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-User-Id": "u", "X-Filler": "v" * 200_000},
        )
    # uvicorn/httptools reject oversized header blocks at the HTTP layer.
    assert big.status_code < 500 or big.status_code == 431
    repeated = httpx.post(
        gateway.url + CHAT,
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers=[("X-User-Id", "a"), ("X-User-Id", "b")] + [("X-Noise", "n")] * 500,
        timeout=30,
    )
    assert repeated.status_code < 500, repeated.text


HOSTILE_IDS = [
    "' OR 1=1 --",
    "alice' OR user_id != '",
    '"; DROP TABLE memories; --',
    "a\\' OR \\'1\\'=\\'1",
    "nul\x00byte",
    "x" * 10_000,
    "\u0430lice",  # Cyrillic a: a lookalike of "alice"
    "alice\u200b",
    "../../etc/passwd",
    "%00%27",
    "\U0001f600" * 50,
]


@pytest.mark.parametrize("user_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_hostile_user_ids_never_500_and_never_reach_another_user(
    http: httpx.Client, user_id: str
) -> None:
    added = http.post(
        "/v1/memories", json={"user_id": "alice", "text": "Alice only", "infer": False}
    )
    assert added.status_code == 201
    for response in (
        http.get("/v1/memories", params={"user_id": user_id}),
        http.post("/v1/memories/search", json={"user_id": user_id, "query": "Alice"}),
        http.get("/v1/memories/export", params={"user_id": user_id}),
        http.post("/v1/memories", json={"user_id": user_id, "text": "mine", "infer": False}),
        http.delete("/v1/memories", params={"user_id": user_id}),
    ):
        assert response.status_code < 500, (response.status_code, response.text[:200])
        if response.status_code >= 400:
            assert_openai_4xx(response)
        assert "Alice only" not in response.text
    # Chat with the id as a header (where it can be sent) and as the body's `user`.
    try:
        header = http.post(
            CHAT,
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-User-Id": user_id},
        )
        assert header.status_code < 500
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        pass  # not representable in a header: the client cannot even send it
    body = http.post(
        CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": user_id}
    )
    assert body.status_code < 500, body.text[:200]
    if body.status_code >= 400:
        assert_openai_4xx(body)
    assert [
        m["text"] for m in http.get("/v1/memories", params={"user_id": "alice"}).json()["data"]
    ] == ["Alice only"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/memories/search", lambda q: {"query": q, "user_id": "pat"}),
        ("/mem0/v3/memories/search/", lambda q: {"query": q, "filters": {"user_id": "pat"}}),
    ],
)
def test_a_pasted_search_query_is_searched_by_its_start_and_end_only(
    http: httpx.Client, upstream: ScriptedUpstream, path: str, body: Callable[[str], dict]
) -> None:
    """Search time grows with the query: a 40k-character query costs what a
    2k one does (its start and its end), as a chat's does."""
    added = http.post(
        "/v1/memories", json={"user_id": "pat", "text": "Owns a red bicycle", "infer": False}
    )
    assert added.status_code == 201, added.text
    query = "START " + "filler words " * 3000 + " does pat own a bicycle END"
    upstream.reset()
    response = http.post(path, json=body(query))
    assert response.status_code == 200, response.text
    embedded = [
        text
        for r in upstream.requests
        if r.path.endswith("/embeddings")
        for text in ([r.json["input"]] if isinstance(r.json["input"], str) else r.json["input"])
    ]
    assert embedded, "the query was not embedded"
    assert all(len(text) <= 2100 for text in embedded), [len(t) for t in embedded]
    assert any(t.startswith("START") and t.endswith("END") for t in embedded)
