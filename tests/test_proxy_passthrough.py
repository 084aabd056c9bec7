"""Every other /v1/ path is relayed verbatim; models pick their upstream."""

from __future__ import annotations

import httpx

from gateway.config import Config, UpstreamConfig
from gateway.routing import Router
from tests.gateway_server import gateway_config_for
from tests.upstream import JSONReply


def test_models_pass_through(client, direct_client):
    assert client.models.list().model_dump() == direct_client.models.list().model_dump()


def test_embeddings_pass_through(client, direct_client, upstream):
    via_gateway = client.embeddings.create(model="test-embed", input=["one", "two"], dimensions=4)
    direct = direct_client.embeddings.create(model="test-embed", input=["one", "two"], dimensions=4)
    assert via_gateway.model_dump() == direct.model_dump()
    assert upstream.last().json["dimensions"] == 4


def test_any_path_method_query_and_body_are_forwarded_verbatim(http, upstream):
    upstream.push(
        JSONReply({"deleted": True}, status=202, headers={"x-request-id": "req_del"}),
        path="/v1/files/file-1/content",
    )
    response = http.request(
        "DELETE",
        "/v1/files/file-1/content?purpose=a%20b&x=1",
        content=b"\x00binary\xff",
        headers={"content-type": "application/octet-stream", "x-extra": "1"},
    )
    assert response.status_code == 202
    assert response.json() == {"deleted": True}
    assert response.headers["x-request-id"] == "req_del"
    sent = upstream.last()
    assert (sent.method, sent.path, sent.query) == (
        "DELETE",
        "/v1/files/file-1/content",
        "purpose=a%20b&x=1",
    )
    assert sent.body == b"\x00binary\xff"
    assert sent.headers["x-extra"] == "1"


def test_a_streamed_request_body_is_streamed_upstream(http, upstream):
    upstream.push(JSONReply({"ok": True}), path="/v1/uploads")

    def parts():
        for i in range(20):
            yield f"part-{i};".encode()

    response = http.post("/v1/uploads", content=parts())
    assert response.status_code == 200
    assert upstream.last().body == b"".join(f"part-{i};".encode() for i in range(20))


def test_upstream_404_passes_through(http):
    response = http.get("/v1/no-such-thing")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "no route /v1/no-such-thing"


def test_router_exact_then_glob_then_default():
    config = Config(
        upstreams=[
            UpstreamConfig(
                name="openai", base_url="https://api.openai.com/v1/", models=["gpt-*", "o1"]
            ),
            UpstreamConfig(
                name="local", base_url="http://127.0.0.1:11434/v1", models=["llama*", "gpt-oss"]
            ),
            UpstreamConfig(name="fallback", base_url="http://127.0.0.1:9/v1", default=True),
        ]
    )
    router = Router(config)
    assert router.pick("gpt-4o").name == "openai"
    assert router.pick("o1").name == "openai"
    assert router.pick("llama3.1:8b").name == "local"
    # An exact name beats an earlier glob that also matches.
    assert router.pick("gpt-oss").name == "local"
    assert router.pick("mistral").name == "fallback"
    assert router.pick(None).name == "fallback"
    assert router.pick(42).name == "fallback"
    assert router.pick("gpt-4o").base_url == "https://api.openai.com/v1"


def test_requests_are_routed_by_model(start_gateway, upstream, tmp_path, client):
    config = gateway_config_for(
        upstream.url,
        tmp_path,
        upstreams=[
            {"name": "cloud", "base_url": upstream.url, "api_key": "sk-cloud", "models": ["gpt-*"]},
            {"name": "local", "base_url": upstream.url, "api_key": "sk-local", "default": True},
        ],
    )
    gw = start_gateway(config)
    with gw.client() as sdk:
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}]
        )
        assert upstream.last().headers["authorization"] == "Bearer sk-cloud"
        sdk.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "a"}])
        assert upstream.last().headers["authorization"] == "Bearer sk-local"
        # Passthrough bodies are routed by their model too.
        sdk.embeddings.create(model="gpt-embed", input="x")
        assert upstream.last().headers["authorization"] == "Bearer sk-cloud"
        sdk.models.list()
        assert upstream.last().headers["authorization"] == "Bearer sk-local"


def test_gzip_passthrough_keeps_the_encoding(http, upstream):
    import gzip

    payload = gzip.compress(b'{"object": "list", "data": []}')
    upstream.push(
        JSONReply(payload, headers={"content-encoding": "gzip"}), path="/v1/vector_stores"
    )
    response = http.get("/v1/vector_stores", headers={"accept-encoding": "gzip"})
    assert response.json() == {"object": "list", "data": []}
    assert response.headers["content-encoding"] == "gzip"


def test_head_and_options_are_forwarded(http, upstream):
    upstream.push(JSONReply(b"", status=200), path="/v1/models")
    assert http.head("/v1/models").status_code == 200
    assert upstream.last().method == "HEAD"
    # The scripted upstream has no OPTIONS route: its own 404 comes back.
    assert httpx.options(str(http.base_url) + "/v1/models").status_code == 404
    assert upstream.last().method == "OPTIONS"
