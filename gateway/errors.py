"""Errors the gateway makes itself, in the shape of the API that was called.

OpenAI SDKs only understand `{"error": {message, type, param, code}}` bodies,
so every error we produce - ours or Litestar's (404, 405, 413, validation) -
is rendered that way; under `/v1/messages` (Anthropic Messages) it is
Anthropic's `{"type": "error", "error": {type, message}}`, whose type names
are the same. Upstream errors never come through here: they pass through
unchanged.

Litestar's validation errors carry what was wrong in `extra` (one entry per
field: `message`, `key`, `source`); they are rewritten the way OpenAI words
its own: `param` is the field path the client sent (`messages[0].content`),
`code` the kind of mistake, and the message names the field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    ClientException,
    HTTPException,
    SerializationException,
    ValidationException,
)
from litestar.params import ParameterKwarg
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


ANTHROPIC_PATHS = "/v1/messages"


def error_body(
    message: str,
    *,
    type: str,
    param: str | None = None,
    code: str | None = None,
    anthropic: bool = False,
) -> bytes:
    if anthropic:
        return msgspec.json.encode({"type": "error", "error": {"type": type, "message": message}})
    return msgspec.json.encode(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    )


def _anthropic(request: Request[Any, Any, Any] | None) -> bool:
    return request is not None and request.url.path.startswith(ANTHROPIC_PATHS)


def error_response(
    exc: GatewayError, request: Request[Any, Any, Any] | None = None
) -> Response[bytes]:
    headers = {}
    if exc.retryable is not None:
        # The openai and anthropic SDKs retry 408/409/429/5xx unless told this cannot help.
        headers["x-should-retry"] = "true" if exc.retryable else "false"
    body = error_body(
        exc.message, type=exc.type, param=exc.param, code=exc.code, anthropic=_anthropic(request)
    )
    return Response(
        content=body, status_code=exc.status, media_type="application/json", headers=headers
    )


def _gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return error_response(exc, request)


_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    message = exc.detail or "error"
    if status == 413:
        message = "request body is larger than the configured server.max_body_bytes"
    headers = dict(exc.headers or {})
    if 400 <= status < 500:
        # Sending the same request again cannot fix it.
        headers["x-should-retry"] = "false"
    body = error_body(
        message, type=error_type(status), code=_CODES.get(status), anthropic=_anthropic(request)
    )
    return Response(
        content=body, status_code=status, media_type="application/json", headers=headers
    )


class _Problem(NamedTuple):
    """One thing wrong with a request, as OpenAI reports it."""

    message: str
    param: str | None
    code: str


# msgspec's wording (through Litestar) for a field an object has too much or lacks.
_FIELD = re.compile(r"^Object (contains unknown|missing required) field `(.+)`$")
_NOT_AN_OBJECT = _Problem("the request body must be a JSON object", None, "invalid_json")


def _client_name(request: Request[Any, Any, Any], key: str) -> str:
    """The name the client sent: a parameter's alias (`state`), not the
    handler's argument (`job_state`) that Litestar reports."""
    handler = request.scope.get("route_handler")
    field = getattr(handler, "parsed_fn_signature", None)
    kwarg = getattr(field.parameters.get(key), "kwarg_definition", None) if field else None
    if isinstance(kwarg, ParameterKwarg):
        return kwarg.name or kwarg.query or kwarg.header or kwarg.cookie or key
    return key


def _reason(message: str) -> str:
    """msgspec's "Expected `int`, got `str`" as running text."""
    text = message.replace("`", "").rstrip(".")
    return text[:1].lower() + text[1:]


def _field_problem(request: Request[Any, Any, Any], error: Mapping[str, Any]) -> _Problem:
    """Translate one entry of a ValidationException's `extra`."""
    message = str(error.get("message") or "invalid")
    key = error.get("key")
    # The body as a whole is Litestar's `data` argument.
    whole_body = key == "data" and error.get("source") == "body"
    at = None if key is None or whole_body else _client_name(request, str(key))
    if found := _FIELD.match(message):
        name = found.group(2) if at is None else f"{at}.{found.group(2)}"
        if found.group(1) == "contains unknown":
            return _Problem(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        return _Problem(
            f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
        )
    if whole_body:
        return _NOT_AN_OBJECT
    if at is None:
        return _Problem(f"Invalid request: {_reason(message)}.", None, "invalid_value")
    if message.startswith("Expected") and ", got " in message:
        return _Problem(f"Invalid type for '{at}': {_reason(message)}.", at, "invalid_type")
    return _Problem(f"Invalid value for '{at}': {_reason(message)}.", at, "invalid_value")


def _request_problem(request: Request[Any, Any, Any], exc: ClientException) -> _Problem | None:
    """What a 400 raised while parsing the request says, or None for one
    that carries no detail worth rewriting."""
    if isinstance(exc.__cause__, SerializationException):
        return _Problem(f"the request body is not valid JSON: {exc.detail}", None, "invalid_json")
    extra = exc.extra if isinstance(exc, ValidationException) else None
    if isinstance(extra, list) and extra and all(isinstance(e, Mapping) for e in extra):
        problems = [_field_problem(request, e) for e in extra]
        # OpenAI's shape has one param: the first; the message lists them all.
        message = " ".join(dict.fromkeys(p.message for p in problems))
        return problems[0]._replace(message=message)
    return None


def _client_error(request: Request[Any, Any, Any], exc: ClientException) -> Response[bytes]:
    problem = _request_problem(request, exc) if exc.status_code == 400 else None
    if problem is None:
        return _http_exception(request, exc)
    message, param, code = problem
    return error_response(GatewayError(400, message, param=param, code=code, retryable=False))


def _too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[bytes]:
    """msgspec gives up on absurdly nested JSON with a RecursionError: the
    client's mistake, answered like any other body that is not JSON."""
    if "deserializing" not in str(exc):
        return _unexpected(request, exc)
    message = f"the request body is not valid JSON: {exc}"
    return error_response(GatewayError(400, message, code="invalid_json", retryable=False))


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.exception("unhandled error", exc_info=exc)
    body = error_body("internal gateway error", type="api_error", code="internal_error")
    return Response(content=body, status_code=500, media_type="application/json")


exception_handlers: ExceptionHandlersMap = {
    GatewayError: _gateway_error,
    ClientException: _client_error,
    HTTPException: _http_exception,
    RecursionError: _too_deep,
    Exception: _unexpected,
}
