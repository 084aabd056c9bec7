"""The upstream client's connection layer: httpx's API over aiohttp's connections.

The gateway speaks httpx everywhere (one `AsyncClient`, its requests,
responses, timeouts and exceptions); only the layer that moves bytes is
replaced. httpx's own (httpcore, pure Python over anyio streams) cost
0.74-0.86 ms of CPU per call on the benchmark machine, and 1.0-1.05 ms for a
17-chunk stream; over aiohttp's C parser and pool, 0.47-0.54 and 0.39-0.42
(docs/benchmarks.md, "Upstream client"). Every chat request makes one such
call, and every recorded exchange a second one (the extraction model).

What httpcore did and this keeps: bodies as they arrive, compressed bytes
left compressed (httpx decodes them where the gateway asks it to), repeated
headers in order, no cookie ever kept, the proxies the environment names
(`HTTPS_PROXY`, `NO_PROXY`...), and failures raised as the httpx exceptions
the gateway maps to 502 and 504.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx
import yarl

from gateway.config import HTTPConfig
from memory.cookies import NoCookies

logger = logging.getLogger("gateway")

# Header lines as long as h11 (httpcore's parser) accepts; aiohttp's default is 8 KiB.
_MAX_HEADER_BYTES = 64 * 1024
# aiohttp adds these when absent; httpx already set what the request should carry.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def upstream_client(http: HTTPConfig) -> httpx.AsyncClient:
    """The client for upstreams: chat requests, and the extraction model's calls.
    `http.transport: httpx` keeps httpx's own connections (httpcore)."""
    limits = httpx.Limits(
        max_connections=http.max_connections,
        max_keepalive_connections=http.max_keepalive_connections,
    )
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=http.connect_timeout,
            read=http.read_timeout,
            write=http.write_timeout,
            pool=http.pool_timeout,
        ),
        limits=limits,
        transport=AiohttpTransport(limits=limits) if http.transport == "aiohttp" else None,
        follow_redirects=False,
        # Shared by every user: it must never keep an upstream's cookies.
        cookies=NoCookies(),
    )


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose connections are an aiohttp session's.

    The session is made on first use, inside the running event loop that it
    then belongs to, like httpcore's pool.
    """

    def __init__(self, *, limits: httpx.Limits) -> None:
        self._limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._env_proxies = urllib.request.getproxies()  # HTTPS_PROXY, NO_PROXY...
        self._proxies: dict[tuple[str, str], str | None] = {}

    def _proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy the environment names for this upstream, like httpx's
        `trust_env` (upstreams are few: one lookup each)."""
        key = (url.scheme, url.host)
        if key not in self._proxies:
            proxy = self._env_proxies.get(url.scheme) or self._env_proxies.get("all")
            bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
            if proxy and bypass(url.host, self._env_proxies):
                proxy = None
            if proxy and not proxy.startswith(("http://", "https://")):
                # aiohttp speaks HTTP proxies only (httpx needed an extra for SOCKS).
                logger.warning(
                    "proxy %s for %s ignored: only http(s) proxies are supported",
                    proxy.split("://", 1)[0] + "://...",
                    url.host,
                )
                proxy = None
            self._proxies[key] = proxy or None
        return self._proxies[key]

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 15.0,
                # httpx's default trust store (certifi), so upstreams verify as before.
                ssl=httpx.create_ssl_context(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Shared by every user: it must never keep an upstream's cookies.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                # The environment's proxies are read once (`_proxy_for`): aiohttp
                # would read them on every request, which costs more than the request.
                trust_env=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                max_line_size=_MAX_HEADER_BYTES,
                max_field_size=_MAX_HEADER_BYTES,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open()
        headers = request.headers.multi_items()
        body: bytes | _RequestBody | None
        try:
            body = request.content or None
        except httpx.RequestNotRead:
            body = _RequestBody(request.stream)  # type: ignore[arg-type]
            # aiohttp frames a body of unknown length itself.
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        # A pooled connection the server closed as it was taken (its keep-alive
        # timeout ran out at that instant: uvicorn's is 5 s, gunicorn's 2 s) fails
        # before any answer. A body in hand is sent once more, on another
        # connection, as the openai SDK itself would; a streamed one cannot be.
        for attempt in (1, 2):
            try:
                return await self._send(session, request, headers, body)
            except httpx.TransportError as exc:
                if isinstance(body, _RequestBody) and body.error is not None:
                    raise body.error from None  # the client's body failed, not the upstream
                if attempt == 2 or isinstance(body, _RequestBody) or not _dropped(exc):
                    raise
                logger.debug(
                    "upstream %s dropped a pooled connection; sending again", request.url.host
                )
        raise AssertionError("unreachable")

    async def _send(
        self,
        session: aiohttp.ClientSession,
        request: httpx.Request,
        headers: list[tuple[str, str]],
        body: bytes | _RequestBody | None,
    ) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        connect, pool = timeout.get("connect"), timeout.get("pool")
        with _mapped(connecting=True):
            response = await session.request(
                request.method,
                # Already encoded by httpx: sent exactly as it is, not re-quoted.
                yarl.URL(str(request.url), encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                proxy=self._proxy_for(request.url),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    # aiohttp's `connect` spans the wait for a pooled connection
                    # and the connection itself; httpx times them apart.
                    connect=None if connect is None or pool is None else connect + pool,
                    sock_connect=connect,
                    sock_read=timeout.get("read"),
                ),
                # aiohttp has no write timeout: bodies are bounded
                # (server.max_body_bytes), and a stalled upload ends at sock_read.
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _RequestBody:
    """A streamed request body that remembers why it stopped: aiohttp reports
    any failure of it as a broken connection (e.g. the gateway's own 413 when a
    client's upload outgrows `server.max_body_bytes`)."""

    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream
        self.error: Exception | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except Exception as exc:
            self.error = exc
            raise


class _ResponseStream(httpx.AsyncByteStream):
    """The body as it arrives; closing it early closes the connection."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(connecting=False):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # the connection goes back to the pool
        else:
            self._response.close()  # the rest of the body would be read by the next user


def _dropped(exc: httpx.TransportError) -> bool:
    """Whether the connection broke before any answer without a new connection
    being refused or timing out: what a pooled connection the server had just
    closed does."""
    cause = exc.__cause__
    return isinstance(
        cause, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
    ) and not isinstance(cause, aiohttp.ClientConnectorError)


@contextmanager
def _mapped(*, connecting: bool) -> Iterator[None]:
    """aiohttp's failures as the httpx exceptions httpcore would have raised."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except (TimeoutError, aiohttp.SocketTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except aiohttp.InvalidURL as exc:
        raise httpx.UnsupportedProtocol(str(exc)) from exc
    except (
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientPayloadError,
        aiohttp.ClientResponseError,
    ) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientError as exc:
        error = httpx.ConnectError if connecting else httpx.ReadError
        raise error(str(exc) or type(exc).__name__) from exc
