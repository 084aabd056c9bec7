"""Which headers cross the gateway, in each direction, and with which key."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.identity import Identity
from gateway.routing import Upstream

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones still seen.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"authorization"}
# The ASGI server writes its own framing, date and server lines.
_RESPONSE_DROP = frozenset(
    {name.decode() for name in HOP_BY_HOP} | {"content-length", "date", "server"}
)


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def upstream_request_headers(
    raw: list[tuple[bytes, bytes]],
    *,
    upstream: Upstream,
    identity: Identity,
    consumed: frozenset[bytes],
    keep_length: bool = False,
    identity_encoding: bool = False,
) -> tuple[list[tuple[bytes, bytes]], str | None]:
    """The client's headers as the upstream should see them, and the key sent.

    `raw` are ASGI headers (lower-case names). The key sent upstream is, in
    order: the gateway key's own upstream key, the upstream's configured key,
    else the client's Authorization (and, to an Anthropic upstream, its
    `x-api-key`) unchanged - but a gateway key itself never leaves the
    gateway. An Anthropic upstream gets a key it is given as `x-api-key`.
    The key actually sent (None when none was) is returned with the headers.
    """
    drop = _REQUEST_DROP | consumed
    if keep_length:
        drop = drop - {b"content-length"}
    if identity_encoding:
        drop = drop | {b"accept-encoding"}
    if any(name == b"connection" for name, _ in raw):
        drop = drop | _connection_tokens(raw)
    out = [(name, value) for name, value in raw if name not in drop]

    key = identity.key.upstream_api_key if identity.key is not None else None
    key = key or upstream.api_key
    sent: str | None = None
    anthropic = upstream.api == "anthropic"
    if identity.key is not None or (anthropic and key):
        # The client's x-api-key is a gateway key (it stays here), or is replaced.
        out = [(name, value) for name, value in out if name != b"x-api-key"]
    if key:
        if anthropic:
            out.append((b"x-api-key", key.encode("latin-1")))
        else:
            out.append((b"authorization", b"Bearer " + key.encode("latin-1")))
        sent = key
    elif identity.key is None:
        for name, value in raw:
            if name == b"authorization":
                out.append((name, value))
                token = value.decode("latin-1")
                if token[:7].lower() == "bearer ":
                    sent = token[7:].strip() or None
                break
        if anthropic and sent is None:
            sent = next((v.decode("latin-1") for n, v in raw if n == b"x-api-key"), None)
    if identity_encoding:
        # The copy of the answer is parsed for the after-completion seam.
        out.append((b"accept-encoding", b"identity"))
    return out, sent


def client_response_headers(
    items: Iterable[tuple[str, str]], *, decoded: bool, extra: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """The upstream's response headers minus framing; `decoded` bodies lose content-encoding."""
    drop = _RESPONSE_DROP | {"content-encoding"} if decoded else _RESPONSE_DROP
    out = [(name, value) for name, value in items if name.lower() not in drop]
    if extra:
        out.extend(extra.items())
    return out
