"""The upstream client's connection layer (gateway/transport.py). Its
behaviour on the wire (streams, errors, disconnects, cookies) is specified by
the proxy tests, which all run over it; these pin what they cannot see."""

from __future__ import annotations

import asyncio
import socket
import struct

import httpx
import pytest

from gateway.config import HTTPConfig
from gateway.transport import AiohttpTransport, upstream_client
from tests.gateway_server import gateway_config_for
from tests.upstream import ServerThread


@pytest.fixture
def proxy_env(monkeypatch):
    """No proxy variable from the machine running the tests; set them on it."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def test_upstreams_go_through_the_proxies_the_environment_names(proxy_env):
    proxy_env.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    proxy_env.setenv("NO_PROXY", "internal.example,127.0.0.1")
    transport = AiohttpTransport(limits=httpx.Limits())
    assert transport._proxy_for(httpx.URL("https://api.openai.com/v1")) == (
        "http://proxy.example:3128"
    )
    assert transport._proxy_for(httpx.URL("https://internal.example/v1")) is None
    assert transport._proxy_for(httpx.URL("http://127.0.0.1:8000/v1")) is None
    assert transport._proxy_for(httpx.URL("http://api.example/v1")) is None  # no HTTP_PROXY


def test_all_proxy_covers_every_scheme_and_only_http_proxies_are_used(proxy_env):
    proxy_env.setenv("ALL_PROXY", "http://proxy.example:3128")
    transport = AiohttpTransport(limits=httpx.Limits())
    assert transport._proxy_for(httpx.URL("https://api.openai.com/v1")) == (
        "http://proxy.example:3128"
    )
    proxy_env.setenv("ALL_PROXY", "socks5://proxy.example:1080")
    assert AiohttpTransport(limits=httpx.Limits())._proxy_for(httpx.URL("https://a.b/v1")) is None


def test_the_upstream_client_keeps_the_configured_timeouts():
    client = upstream_client(HTTPConfig(connect_timeout=3, read_timeout=45, pool_timeout=2))
    assert client.timeout == httpx.Timeout(connect=3, read=45, write=60, pool=2)
    assert isinstance(client._transport, AiohttpTransport)
    assert not client.follow_redirects
    fallback = upstream_client(HTTPConfig(transport="httpx"))
    assert isinstance(fallback._transport, httpx.AsyncHTTPTransport)


class ForwardProxy:
    """A minimal HTTP forward proxy (ASGI): records each request's target and
    fetches it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        host = dict(headers)["host"]
        target = f"http://{host}{scope['raw_path'].decode()}"
        self.seen.append((scope["method"], target))
        forwarded = [(k, v) for k, v in headers if k not in ("host", "content-length")]
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = await client.request(scope["method"], target, content=body, headers=forwarded)
        dropped = ("content-length", "transfer-encoding", "content-encoding")
        await send(
            {
                "type": "http.response.start",
                "status": answer.status_code,
                "headers": [
                    (k.encode(), v.encode()) for k, v in answer.headers.items() if k not in dropped
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer.content})


def test_upstream_requests_go_through_the_proxy_the_environment_names(
    proxy_env, upstream, start_gateway, tmp_path
):
    proxy = ForwardProxy()
    server = ServerThread(proxy).start()
    try:
        proxy_env.setenv("HTTP_PROXY", server.url)
        gateway = start_gateway(gateway_config_for(upstream.url, tmp_path / "data"))
        reply = gateway.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        server.stop()
    assert reply.choices[0].message.content == "echo: hi"
    # (The test's own client honours HTTP_PROXY too: its call to the gateway is there as well.)
    assert ("POST", upstream.url + "/chat/completions") in proxy.seen


class DroppingServer:
    """An HTTP/1.1 server on loopback that answers the first request of each
    connection and resets the connection when a second one comes: a server
    whose keep-alive timeout ran out just as the client reused the connection."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        for served in range(2):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(
                (
                    int(h.split(b":")[1])
                    for h in head.split(b"\r\n")
                    if h.lower().startswith(b"content-length:")
                ),
                0,
            )
            body = await reader.readexactly(length)
            if served == 1:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                break
            self.answered.append(body)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
            )
            await writer.drain()
        writer.close()


@pytest.fixture
async def dropping_server():
    server = DroppingServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    yield server
    listener.close()
    await listener.wait_closed()


async def test_a_request_on_a_connection_the_server_just_dropped_is_sent_again(dropping_server):
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=httpx.Limits())) as client:
        first = await client.post(dropping_server.url + "/v1/chat/completions", content=b"one")
        second = await client.post(dropping_server.url + "/v1/chat/completions", content=b"two")
    assert (first.status_code, first.text, second.status_code, second.text) == (
        200,
        "ok",
        200,
        "ok",
    )
    assert dropping_server.answered == [b"one", b"two"]
    assert dropping_server.connections == 2


async def test_a_streamed_body_is_not_sent_again(dropping_server):
    """The stream is spent: the failure is the upstream's, as with httpcore."""

    async def upload():
        yield b"two"

    async with httpx.AsyncClient(transport=AiohttpTransport(limits=httpx.Limits())) as client:
        await client.post(dropping_server.url + "/v1/chat/completions", content=b"one")
        with pytest.raises(httpx.TransportError):
            await client.post(dropping_server.url + "/v1/chat/completions", content=upload())
    assert dropping_server.answered == [b"one"]
