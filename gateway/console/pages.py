"""Rendering console pages: the Jinja2 environment, the security headers,
who is looking (`Viewer`), and errors as HTML pages.

Every template is autoescaped: memories are text users (and the extraction
model) wrote, so `<script>` in one is shown, never run. The pages carry no
script at all, and the Content-Security-Policy would refuse an inline one.
"""

from __future__ import annotations

import base64
import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from litestar import Request, Response
from litestar.exceptions import HTTPException

from gateway.console.session import (
    COOKIE_PATH,
    CSRF_COOKIE,
    SESSION_COOKIE,
    Session,
    Sessions,
    is_https,
    new_csrf_cookie,
)
from gateway.errors import GatewayError
from gateway.memories_access import Access, Principal

logger = logging.getLogger("gateway.console")

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # Pages show users' memories: never kept by a browser or proxy cache.
    "Cache-Control": "no-store",
}


def user_segment(user_id: str) -> str:
    """A user id as one URL path segment. Ids may hold '/', '%' or be '..',
    which a path cannot carry: those (and ids starting with '~') travel as
    '~' + base64url, every other id as itself, percent-quoted."""
    if user_id in (".", "..") or user_id.startswith("~") or any(c in user_id for c in "/\\%?#"):
        return "~" + base64.urlsafe_b64encode(user_id.encode()).decode().rstrip("=")
    return quote(user_id, safe="")


def user_from_segment(segment: str) -> str:
    """The inverse of `user_segment` (Litestar has already percent-decoded it)."""
    if segment.startswith("~"):
        try:
            return base64.urlsafe_b64decode(segment[1:] + "=" * (-len(segment[1:]) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            raise GatewayError(404, "no such user page", code="not_found") from None
    return segment


def _when(value: datetime | float | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters.update(when=_when, duration=_duration, size=_size, user_url=user_segment)


@dataclass(slots=True)
class Viewer:
    """Who is looking at a page, and the CSRF token their forms must carry."""

    principal: Principal
    session: Session | None
    csrf_token: str
    # A fresh double-submit cookie to set on the response (no session yet).
    new_csrf_cookie: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.principal.user_id is None


class NeedLogin(Exception):
    """No valid session and no other way in: the login form."""

    def __init__(self, ended: bool = False) -> None:
        super().__init__("login needed")
        # A session cookie was sent but is no longer valid (expired, key revoked).
        self.ended = ended


def sessions_of(request: Request[Any, Any, Any]) -> Sessions:
    """The app's session maker, made once from its configuration and access rule."""
    state = request.app.state
    sessions: Sessions | None = state.get("console_sessions")
    if sessions is None:
        access: Access = state.memory_access
        sessions = Sessions(state.config.auth, access, state.issued_keys)
        state.console_sessions = sessions
    return sessions


def csrf_cookie_of(request: Request[Any, Any, Any]) -> tuple[str, str | None]:
    """The double-submit token: the cookie's, or a new one to set."""
    current = request.cookies.get(CSRF_COOKIE)
    if current:
        return current, None
    fresh = new_csrf_cookie()
    return fresh, fresh


async def provide_viewer(request: Request[Any, Any, Any]) -> Viewer:
    """The console's caller: a valid session cookie, else whoever the
    management API's rule says (a local client when no admin key is set, or a
    bearer key); neither: NeedLogin."""
    sessions = sessions_of(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    session = await sessions.verify(cookie)
    if session is not None:
        return Viewer(session.principal, session, sessions.csrf_token(session))
    access: Access = request.app.state.memory_access
    try:
        principal = access.principal(request)
    except GatewayError:
        raise NeedLogin(ended=bool(cookie)) from None
    token, fresh = csrf_cookie_of(request)
    return Viewer(principal, None, token, fresh)


def set_csrf_cookie(request: Request[Any, Any, Any], response: Response[Any], value: str) -> None:
    response.set_cookie(
        CSRF_COOKIE,
        value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


def render(
    request: Request[Any, Any, Any],
    template: str,
    viewer: Viewer | None,
    *,
    status: int = 200,
    **context: Any,
) -> Response[bytes]:
    html = environment.get_template(template).render(
        viewer=viewer,
        csrf_token=viewer.csrf_token if viewer else "",
        **{"section": None, "notice": None, "problem": None, **context},
    )
    response = Response(
        content=html.encode(),
        status_code=status,
        media_type="text/html",
        headers=SECURITY_HEADERS,
    )
    if viewer is not None and viewer.new_csrf_cookie:
        set_csrf_cookie(request, response, viewer.new_csrf_cookie)
    return response


def error_page(
    request: Request[Any, Any, Any], status: int, message: str, *, title: str | None = None
) -> Response[bytes]:
    titles = {
        400: "Bad request",
        401: "Not logged in",
        403: "Forbidden",
        404: "Not found",
        503: "Unavailable",
    }
    return render(
        request,
        "error.html",
        None,
        status=status,
        title=title or titles.get(status, "Error"),
        message=message,
        status_code=status,
    )


# -- exception handlers (the console's pages answer in HTML, never JSON) -------


def _gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return error_page(request, exc.status, exc.message)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    return error_page(request, exc.status_code, exc.detail or "error")


def _storage_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.error("console: memory storage failed: %s: %s", type(exc).__name__, exc)
    return error_page(
        request,
        503,
        "memory storage is unavailable (the data directory refused the operation);"
        " see the gateway's log",
    )


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.exception("console: unhandled error", exc_info=exc)
    return error_page(request, 500, "internal gateway error; see the gateway's log")


def _need_login(request: Request[Any, Any, Any], exc: NeedLogin) -> Response[Any]:
    if request.method != "GET":
        response = error_page(request, 401, "log in first")
    else:
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        location = "/ui/login?next=" + quote(target, safe="")
        if exc.ended:
            location += "&ended=1"
        response = Response(
            content=b"", status_code=303, headers={**SECURITY_HEADERS, "Location": location}
        )
    if exc.ended:
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


exception_handlers: dict[Any, Any] = {
    NeedLogin: _need_login,
    GatewayError: _gateway_error,
    HTTPException: _http_error,
    OSError: _storage_error,
    sqlite3.Error: _storage_error,
    Exception: _unexpected,
}
