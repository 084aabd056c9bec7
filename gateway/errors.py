"""Errors the gateway makes itself, in OpenAI's shape.

Clients are OpenAI SDKs: they only understand `{"error": {...}}` bodies, so
every error we produce - ours or Litestar's (404, 405, 413, validation) - is
rendered that way. Upstream errors never come through here: they pass through
unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

logger = logging.getLogger("gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """An error answered by the gateway itself, never by the upstream."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        # None leaves the SDK's default retry policy alone.
        self.retryable = retryable


def error_type(status: int) -> str:
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> bytes:
    return msgspec.json.encode(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    )


def error_response(exc: GatewayError) -> Response[bytes]:
    headers = {}
    if exc.retryable is not None:
        # The openai SDK retries 408/409/429/5xx unless told this cannot help.
        headers["x-should-retry"] = "true" if exc.retryable else "false"
    return Response(
        content=error_body(exc.message, type=exc.type, param=exc.param, code=exc.code),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return error_response(exc)


_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    message = exc.detail or "error"
    if status == 413:
        message = "request body is larger than the configured server.max_body_bytes"
    headers = dict(exc.headers or {})
    if 400 <= status < 500:
        # Sending the same request again cannot fix it.
        headers["x-should-retry"] = "false"
    body = error_body(message, type=error_type(status), code=_CODES.get(status))
    return Response(
        content=body, status_code=status, media_type="application/json", headers=headers
    )


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.exception("unhandled error", exc_info=exc)
    body = error_body("internal gateway error", type="api_error", code="internal_error")
    return Response(content=body, status_code=500, media_type="application/json")


exception_handlers: ExceptionHandlersMap = {
    GatewayError: _gateway_error,
    HTTPException: _http_exception,
    Exception: _unexpected,
}
