"""The console's pages and forms, under /ui.

Reads and writes go through the memory engine exactly as the management API
does (gateway/memories_api.py): the engine from the app's MemoryHooks,
scopes from `scope_of` with the caller's principal, so a per-user key's
session reaches its own user only, and every state change is a POST
carrying the session's CSRF token (gateway/console/session.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from litestar import Request, Response, get, post
from litestar.datastructures import FormMultiDict
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from gateway.console.disk import store_on_disk
from gateway.console.pages import (
    SECURITY_HEADERS,
    NeedLogin,
    Viewer,
    csrf_cookie_of,
    error_page,
    provide_viewer,
    render,
    sessions_of,
    set_csrf_cookie,
    user_from_segment,
    user_segment,
)
from gateway.console.session import (
    COOKIE_PATH,
    CSRF_COOKIE,
    CSRF_FIELD,
    SESSION_COOKIE,
    LoginRefused,
    foreign_origin,
    is_https,
    tokens_match,
)
from gateway.errors import GatewayError
from gateway.identity import scope_for
from gateway.memories_access import admin_only, scope_of
from gateway.memories_api import provide_engine
from memory.clipping import search_query
from memory.engine import MemoryEngine
from memory.models import Memory, Scope

Caller = NamedDependency[Viewer]

USERS_PER_PAGE = 50
MEMORIES_PER_PAGE = 100
SEARCH_LIMIT = 50
# Text search looks through this many of the user's memories.
TEXT_SEARCH_ROWS = 2000
JOBS_PER_STATE = 100
REQUESTS_SHOWN = 50
# A user's last activity: the newest change among their newest memories.
ACTIVITY_ROWS = 200

# What a redirect after a POST may announce (fixed texts: nothing is reflected).
NOTICES = {
    "added": "Memory added.",
    "updated": "Memory updated.",
    "deleted": "Memory deleted. Its history stays until the user is erased.",
    "erased": "User erased: memories, history and queued jobs.",
    "retried": "Failed jobs put back in the queue.",
    "logged-out": "Logged out.",
}
PROBLEMS = {
    "confirm": "Not erased: type the user id exactly to confirm.",
    "empty": "A memory's text must not be empty.",
}


def see_other(location: str) -> Response[bytes]:
    return Response(
        content=b"", status_code=303, headers={**SECURITY_HEADERS, "Location": location}
    )


def user_url(user_id: str, rest: str = "") -> str:
    return f"/ui/users/{user_segment(user_id)}{rest}"


async def checked_form(request: Request[Any, Any, Any], viewer: Caller) -> FormMultiDict:
    """The form of a state-changing request, after the origin and CSRF checks."""
    if foreign_origin(request):
        raise GatewayError(403, "refused: this request comes from another site")
    form = await request.form()
    if not tokens_match(form.get(CSRF_FIELD), viewer.csrf_token):
        raise GatewayError(
            403, "refused: the form's CSRF token is missing or wrong; reload the page and retry"
        )
    return form


def _field(form: FormMultiDict, name: str) -> str | None:
    value = form.get(name)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


async def _engine(request: Request[Any, Any, Any]) -> MemoryEngine:
    return await provide_engine(request)


def _safe_next(target: str | None) -> str:
    """Only a console path: never another site (an open redirect)."""
    if (
        target
        and target.startswith("/ui/")
        and not target.startswith("//")
        and "\\" not in target
        and not any(ord(c) < 32 for c in target)
    ):
        return target
    return "/ui/"


# -- home, login, logout ----------------------------------------------------------


@get("/", name="console:home")
async def home(request: Request[Any, Any, Any], viewer: Caller) -> Response[bytes]:
    try:
        await _engine(request)
    except GatewayError as exc:
        # Memory off or not open yet: say so; the request view still works.
        return render(request, "home.html", viewer, status=200, memory_problem=exc.message)
    if viewer.is_admin:
        return see_other("/ui/users")
    assert viewer.principal.user_id is not None
    return see_other(user_url(viewer.principal.user_id))


@get("/login", name="console:login")
async def login_form(
    request: Request[Any, Any, Any],
    next: FromQuery[str | None] = None,
    ended: FromQuery[bool] = False,
) -> Response[bytes]:
    try:
        viewer = await provide_viewer(request)
    except NeedLogin:
        viewer = None
    if viewer is not None and viewer.session is not None:
        return see_other(_safe_next(next))
    token, fresh = csrf_cookie_of(request)
    response = render(
        request,
        "login.html",
        None,
        csrf=token,
        next=_safe_next(next),
        ended=ended,
        error=None,
        local_admin=viewer is not None and viewer.is_admin,
        can_log_in=sessions_of(request).can_log_in,
    )
    if fresh:
        set_csrf_cookie(request, response, fresh)
    return response


@post("/login", name="console:login-submit")
async def login(request: Request[Any, Any, Any]) -> Response[bytes]:
    if foreign_origin(request):
        raise GatewayError(403, "refused: this request comes from another site")
    form = await request.form()
    token = request.cookies.get(CSRF_COOKIE)
    if not tokens_match(form.get(CSRF_FIELD), token):
        raise GatewayError(
            403, "refused: the form's CSRF token is missing or wrong; reload the page and retry"
        )
    target = _safe_next(_field(form, "next"))
    sessions = sessions_of(request)
    try:
        session, cookie = await sessions.login(_field(form, "key") or "")
    except LoginRefused as exc:
        return render(
            request,
            "login.html",
            None,
            status=401,
            csrf=token,
            next=target,
            ended=False,
            error=str(exc),
            local_admin=False,
            can_log_in=sessions.can_log_in,
        )
    if session.user_id is not None and target == "/ui/":
        target = user_url(session.user_id)
    response = see_other(target)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=max(1, session.expires_at - int(time.time())),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )
    return response


@post("/logout", name="console:logout")
async def logout(request: Request[Any, Any, Any], viewer: Caller) -> Response[bytes]:
    await checked_form(request, viewer)
    response = see_other("/ui/login?ended=0")
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


# -- users ------------------------------------------------------------------------


async def _last_activity(
    engine: MemoryEngine, users: Sequence[tuple[str, int]]
) -> dict[str, datetime | None]:
    """Per user, the newest created/updated time among their newest memories
    (listed oldest first: the last page of them), a few users at a time."""
    limit = asyncio.Semaphore(4)

    async def one(user_id: str, count: int) -> datetime | None:
        async with limit:
            memories = await engine.store.list(
                Scope(user_id=user_id),
                limit=ACTIVITY_ROWS,
                offset=max(0, count - ACTIVITY_ROWS),
            )
        return max((m.updated_at for m in memories), default=None)

    found = await asyncio.gather(*(one(u, n) for u, n in users))
    return {u: when for (u, _), when in zip(users, found, strict=True)}


@get("/users", name="console:users")
async def users(
    request: Request[Any, Any, Any],
    viewer: Caller,
    q: FromQuery[str | None] = None,
    page: FromQuery[int] = 1,
    done: FromQuery[str | None] = None,
) -> Response[bytes]:
    admin_only(viewer.principal)
    engine = await _engine(request)
    everyone = await engine.store.users()
    query = (q or "").strip()
    matching = [p for p in everyone if query.casefold() in p[0].casefold()] if query else everyone
    page = max(1, page)
    shown = matching[(page - 1) * USERS_PER_PAGE : page * USERS_PER_PAGE]
    activity = await _last_activity(engine, shown)
    return render(
        request,
        "users.html",
        viewer,
        rows=[(u, n, activity.get(u)) for u, n in shown],
        total=len(everyone),
        matching=len(matching),
        q=query,
        page=page,
        pages=max(1, -(-len(matching) // USERS_PER_PAGE)),
        notice=NOTICES.get(done or ""),
    )


@get("/open-user", name="console:open-user")
async def open_user(viewer: Caller, id: FromQuery[str | None] = None) -> Response[bytes]:
    if not id or not id.strip():
        return see_other("/ui/users")
    return see_other(user_url(id.strip()))


def _scope(viewer: Caller, segment: str, agent: FromQuery[str | None] = None) -> Scope:
    return scope_of(viewer.principal, user_from_segment(segment), agent or None)


@get("/users/{user:str}", name="console:user")
async def user_page(
    request: Request[Any, Any, Any],
    viewer: Caller,
    user: FromPath[str],
    q: FromQuery[str | None] = None,
    mode: FromQuery[str] = "semantic",
    agent: FromQuery[str | None] = None,
    superseded: FromQuery[bool] = False,
    page: FromQuery[int] = 1,
    done: FromQuery[str | None] = None,
    problem: FromQuery[str | None] = None,
) -> Response[bytes]:
    scope = _scope(viewer, user, agent)
    engine = await _engine(request)
    query = (q or "").strip()
    page = max(1, page)
    scores: dict[str, float] = {}
    if query and mode == "semantic":
        hits = await engine.store.search(
            scope, search_query(query), limit=SEARCH_LIMIT, include_superseded=superseded
        )
        memories = [h.memory for h in hits]
        scores = {h.memory.id: h.score for h in hits}
    elif query:
        mode = "text"
        listed = await engine.store.list(
            scope, limit=TEXT_SEARCH_ROWS, include_superseded=superseded
        )
        needle = query.casefold()
        memories = [m for m in listed if needle in m.text.casefold()]
    else:
        memories = await engine.store.list(
            scope,
            limit=MEMORIES_PER_PAGE,
            offset=(page - 1) * MEMORIES_PER_PAGE,
            include_superseded=superseded,
        )
    user_scope = Scope(user_id=scope.user_id)
    count = await engine.store.count(user_scope)
    failed = await engine.jobs(state="failed", user_id=scope.user_id, limit=JOBS_PER_STATE)
    missing = False
    if not memories and not query and page == 1 and count == 0:
        # Nothing active: a user the store never had, unless history or jobs say otherwise.
        kept = await engine.store.list(user_scope, limit=1, include_superseded=True)
        missing = not kept and not failed and not await engine.jobs(user_id=scope.user_id, limit=1)
    return render(
        request,
        "user.html",
        viewer,
        status=404 if missing else 200,
        missing=missing,
        user_id=scope.user_id,
        agent=scope.agent_id or "",
        memories=memories,
        scores=scores,
        count=count,
        failed_jobs=len(failed),
        q=query,
        mode=mode,
        superseded=superseded,
        page=page,
        has_next=not query and len(memories) == MEMORIES_PER_PAGE,
        notice=NOTICES.get(done or ""),
        problem=PROBLEMS.get(problem or ""),
    )


@post("/users/{user:str}/memories", name="console:add")
async def add_memory(
    request: Request[Any, Any, Any], viewer: Caller, user: FromPath[str]
) -> Response[bytes]:
    form = await checked_form(request, viewer)
    user_id = user_from_segment(user)
    scope = scope_for(
        user_id,
        _field(form, "agent_id"),
        _field(form, "session_id"),
        key_user=viewer.principal.user_id,
    )
    text = _field(form, "text")
    if text is None:
        return see_other(user_url(user_id, "?problem=empty"))
    engine = await _engine(request)
    try:
        await engine.add(scope, text=text, infer=False)
    except ValueError as exc:
        raise GatewayError(400, str(exc)) from None
    return see_other(user_url(user_id, "?done=added"))


@get("/users/{user:str}/memories/{memory_id:str}", name="console:memory")
async def memory_page(
    request: Request[Any, Any, Any],
    viewer: Caller,
    user: FromPath[str],
    memory_id: FromPath[str],
    done: FromQuery[str | None] = None,
) -> Response[bytes]:
    scope = _scope(viewer, user)
    engine = await _engine(request)
    memory: Memory | None = await engine.store.get(scope, memory_id)
    history = await engine.store.history(scope, memory_id)
    if memory is None and not history:
        return error_page(request, 404, f"user {scope.user_id!r} has no memory {memory_id!r}")
    return render(
        request,
        "memory.html",
        viewer,
        user_id=scope.user_id,
        memory=memory,
        memory_id=memory_id,
        history=history,
        notice=NOTICES.get(done or ""),
    )


@post("/users/{user:str}/memories/{memory_id:str}/edit", name="console:edit")
async def edit_memory(
    request: Request[Any, Any, Any], viewer: Caller, user: FromPath[str], memory_id: FromPath[str]
) -> Response[bytes]:
    form = await checked_form(request, viewer)
    scope = _scope(viewer, user)
    text = _field(form, "text")
    if text is None:
        raise GatewayError(400, "a memory's text must not be empty")
    engine = await _engine(request)
    try:
        updated = await engine.update(scope, memory_id, text=text)
    except ValueError as exc:
        raise GatewayError(400, str(exc)) from None
    if updated is None:
        return error_page(request, 404, f"user {scope.user_id!r} has no memory {memory_id!r}")
    return see_other(user_url(scope.user_id, f"/memories/{quote(memory_id, safe='')}?done=updated"))


@post("/users/{user:str}/memories/{memory_id:str}/delete", name="console:delete")
async def delete_memory(
    request: Request[Any, Any, Any], viewer: Caller, user: FromPath[str], memory_id: FromPath[str]
) -> Response[bytes]:
    await checked_form(request, viewer)
    scope = _scope(viewer, user)
    engine = await _engine(request)
    if not await engine.store.delete(scope, memory_id):
        return error_page(request, 404, f"user {scope.user_id!r} has no memory {memory_id!r}")
    return see_other(user_url(scope.user_id, "?done=deleted"))


_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@get("/users/{user:str}/export", name="console:export")
async def export(request: Request[Any, Any, Any], viewer: Caller, user: FromPath[str]) -> Stream:
    """JSON lines, as `GET /v1/memories/export` gives them, as a download."""
    scope = _scope(viewer, user)
    engine = await _engine(request)
    lines = await engine.export(scope)

    async def body() -> AsyncIterator[bytes]:
        for line in lines:
            yield line.encode() + b"\n"

    filename = "memories-" + (_FILENAME_UNSAFE.sub("_", scope.user_id)[:80] or "user") + ".jsonl"
    return Stream(
        body(),
        media_type="application/x-ndjson",
        headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'},
    )


@post("/users/{user:str}/erase", name="console:erase")
async def erase(
    request: Request[Any, Any, Any], viewer: Caller, user: FromPath[str]
) -> Response[bytes]:
    form = await checked_form(request, viewer)
    scope = _scope(viewer, user)
    if _field(form, "confirm") != scope.user_id:
        return see_other(user_url(scope.user_id, "?problem=confirm"))
    engine = await _engine(request)
    await engine.delete_all(scope)
    if viewer.is_admin:
        return see_other("/ui/users?done=erased")
    return see_other(user_url(scope.user_id, "?done=erased"))


# -- the extraction queue and the store --------------------------------------------


@get("/queue", name="console:queue")
async def queue(
    request: Request[Any, Any, Any],
    viewer: Caller,
    done: FromQuery[str | None] = None,
    n: FromQuery[int] = 0,
) -> Response[bytes]:
    admin_only(viewer.principal)
    engine = await _engine(request)
    stats = await engine.stats()
    failed, running, pending = await asyncio.gather(
        engine.jobs(state="failed", limit=JOBS_PER_STATE),
        engine.jobs(state="running", limit=JOBS_PER_STATE),
        engine.jobs(state="pending", limit=JOBS_PER_STATE),
    )
    disk = await asyncio.to_thread(store_on_disk, request.app.state.config.data_path)
    notice = NOTICES.get(done or "")
    if done == "retried":
        notice = f"{n} failed job(s) put back in the queue."
    return render(
        request,
        "queue.html",
        viewer,
        stats=stats,
        failed=failed,
        running=running,
        pending=pending,
        disk=disk,
        maintenance=engine.maintenance,
        notice=notice,
    )


@post("/queue/retry", name="console:retry")
async def retry(request: Request[Any, Any, Any], viewer: Caller) -> Response[bytes]:
    form = await checked_form(request, viewer)
    admin_only(viewer.principal)
    user_id = _field(form, "user_id")
    if user_id is not None:
        scope_of(viewer.principal, user_id)  # a valid id, or 400
    engine = await _engine(request)
    retried = await engine.retry_failed(user_id)
    return see_other(f"/ui/queue?done=retried&n={retried}")


# -- recent requests ----------------------------------------------------------------


def _recent(request: Request[Any, Any, Any]) -> Any:
    return request.app.state.get("recent_requests")


@get("/requests", name="console:requests")
async def requests_page(
    request: Request[Any, Any, Any], viewer: Caller, live: FromQuery[bool] = False
) -> Response[bytes]:
    admin_only(viewer.principal)
    recent = _recent(request)
    records = recent.latest(REQUESTS_SHOWN) if recent is not None else []
    return render(request, "requests.html", viewer, records=records, live=live)


@get("/requests/{record_id:int}", name="console:request")
async def request_page(
    request: Request[Any, Any, Any], viewer: Caller, record_id: FromPath[int]
) -> Response[bytes]:
    admin_only(viewer.principal)
    recent = _recent(request)
    record = recent.get(record_id) if recent is not None else None
    if record is None:
        return error_page(request, 404, f"request {record_id} is no longer in the recent list")
    return render(request, "request.html", viewer, record=record)


@get("/{rest:path}", name="console:not-found")
async def not_found(request: Request[Any, Any, Any], rest: FromPath[str]) -> Response[bytes]:
    """Any other path under /ui: a 404 page, not the API's JSON."""
    return error_page(request, 404, "no such console page")


handlers = [
    home,
    login_form,
    login,
    logout,
    users,
    open_user,
    user_page,
    add_memory,
    memory_page,
    edit_memory,
    delete_memory,
    export,
    erase,
    queue,
    retry,
    requests_page,
    request_page,
    not_found,
]
