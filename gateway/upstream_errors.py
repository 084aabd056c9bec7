"""What the client is told when the upstream fails: one table for every stage.

An upstream can fail while the request is sent (`send`: it timed out or could
not be reached), while a whole answer is read (`read`: it broke off), or in the
middle of a relayed stream (`stream`: the status line is gone, so the error
becomes an SSE `error` event). Each failure is a timeout or not; the table
below gives, for each pair, the status, the error code, the message and the
log line. Errors the upstream answers itself (4xx, 5xx) are never mapped: they
pass through unchanged.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import httpx

from gateway.errors import GatewayError
from gateway.routing import Upstream
from memory.redaction import public_url

logger = logging.getLogger("gateway")

Stage = Literal["send", "read", "stream"]


class _Mapped(NamedTuple):
    status: int
    code: str
    # Formatted with `name` (the upstream's, repr'd), `url` (its public base
    # URL) and `error` (the exception's class name).
    message: str
    # Logged at warning level with the upstream's name and the error's class name.
    log: str


_STREAM_BROKE = "the upstream stream from {name!r} broke: {error}"
_STREAM_LOG = "upstream %s stream broke: %s"

# (stage, timed out) -> what the client and the log are told.
UPSTREAM_ERRORS: dict[tuple[Stage, bool], _Mapped] = {
    ("send", True): _Mapped(
        504,
        "upstream_timeout",
        "upstream {name!r} ({url}) did not answer in time",
        "upstream %s timed out: %s",
    ),
    ("send", False): _Mapped(
        502,
        "upstream_unreachable",
        "upstream {name!r} at {url} is unreachable: {error}",
        "upstream %s unreachable: %s",
    ),
    ("read", True): _Mapped(
        504,
        "upstream_timeout",
        "upstream {name!r} did not answer in time",
        "upstream %s body failed: %s",
    ),
    ("read", False): _Mapped(
        502,
        "upstream_error",
        "upstream {name!r} broke off its answer: {error}",
        "upstream %s body failed: %s",
    ),
    ("stream", True): _Mapped(504, "upstream_timeout", _STREAM_BROKE, _STREAM_LOG),
    ("stream", False): _Mapped(502, "upstream_error", _STREAM_BROKE, _STREAM_LOG),
}


def upstream_error(exc: httpx.HTTPError, upstream: Upstream, stage: Stage) -> GatewayError:
    """Log the failure and return the error the client gets for it."""
    mapped = UPSTREAM_ERRORS[stage, isinstance(exc, httpx.TimeoutException)]
    error = type(exc).__name__
    logger.warning(mapped.log, upstream.name, error)
    url = public_url(upstream.base_url) if "{url}" in mapped.message else ""
    message = mapped.message.format(name=upstream.name, url=url, error=error)
    return GatewayError(mapped.status, message, code=mapped.code)
