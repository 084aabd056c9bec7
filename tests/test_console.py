"""The web console at /ui (gateway/console/) over real HTTP: logging in, the
session cookie's flags, CSRF and foreign origins, who sees which user, a
revoked key's session, escaping of memory text, the pages' flows (add,
search, edit, history, delete, export, erase, retry), and memory off.

The same flows in a real browser: tests/test_console_browser.py.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Config
from gateway.recent_requests import RecentRequests, RequestRecord
from tests.extraction import is_extraction, llm_answer, wait_for
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.upstream import JSONReply, Recorded, ScriptedUpstream

ADMIN_KEY = "adm-console-secret"
ALICE_KEY = "gk-alice-console-key"
XSS_TEXT = (
    "Likes <script>window.__xss = 1</script> tea and "
    '<img src=x onerror="window.__xss = 2"> "quotes" & ampersands'
)


def console_config(upstream: ScriptedUpstream, data_dir: Path, **auth: Any) -> Config:
    """Memory on, an admin key and one gateway.yaml key (alice's); extraction
    with its own key, failing for good at the first error (one attempt)."""
    return gateway_config_for(
        upstream.url,
        data_dir,
        memory={
            "llm": {"api_key": "sk-extract"},
            "spool": {"backoff_initial": 0.05, "backoff_max": 0.2, "max_attempts": 1},
        },
        auth={
            "admin_key": ADMIN_KEY,
            "keys": [{"key": ALICE_KEY, "user_id": "alice"}],
            **auth,
        },
    )


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF field on the page"
    return found.group(1)


class Console:
    """A browser-like client: keeps cookies, follows no redirect by itself."""

    def __init__(self, gateway: GatewayServer) -> None:
        self.gateway = gateway
        self.http = httpx.Client(base_url=gateway.url, timeout=30)

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def login(self, key: str, next: str = "/ui/") -> httpx.Response:
        form = self.get("/ui/login")
        assert form.status_code == 200, form.text
        return self.http.post(
            "/ui/login", data={"csrf_token": csrf_of(form.text), "key": key, "next": next}
        )

    def submit(self, page: str, action: str, **fields: str) -> httpx.Response:
        """POST a form of `page` (fetched first, for its CSRF token)."""
        shown = self.get(page)
        assert shown.status_code in (200, 404), shown.text
        return self.http.post(action, data={"csrf_token": csrf_of(shown.text), **fields})


def api(gateway: GatewayServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, gateway.url + path, headers=headers, timeout=30, **kwargs)


def add_memory(gateway: GatewayServer, user: str, text: str, **scope: str) -> dict[str, Any]:
    response = api(
        gateway,
        "POST",
        "/v1/memories",
        json={"user_id": user, "text": text, "infer": False, **scope},
    )
    assert response.status_code == 201, response.text
    memory: dict[str, Any] = response.json()["results"][0]
    return memory


def memories_of(gateway: GatewayServer, user: str) -> list[dict[str, Any]]:
    response = api(gateway, "GET", "/v1/memories", params={"user_id": user})
    data: list[dict[str, Any]] = response.json()["data"]
    return data


@pytest.fixture
def gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> GatewayServer:
    return start_gateway(console_config(upstream, tmp_path / "data"))


@pytest.fixture
def console(gateway: GatewayServer) -> Iterator[Console]:
    client = Console(gateway)
    yield client
    client.close()


@pytest.fixture
def admin(console: Console) -> Console:
    assert console.login(ADMIN_KEY).status_code == 303
    return console


# -- logging in -------------------------------------------------------------------


def test_a_page_without_a_session_sends_to_the_login_form(console: Console) -> None:
    response = console.get("/ui/users?q=al")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=%2Fui%2Fusers%3Fq%3Dal"
    # A form posted without a session is refused, not redirected.
    refused = console.http.post("/ui/queue/retry", data={"csrf_token": "x"})
    assert refused.status_code == 401 and "text/html" in refused.headers["content-type"]


def test_a_wrong_key_gets_401_and_the_form_again(console: Console) -> None:
    response = console.login("not-a-key")
    assert response.status_code == 401
    assert "neither the admin key nor a gateway key" in response.text
    assert 'name="key"' in response.text
    assert "mg_console=" not in response.headers.get("set-cookie", "")
    assert console.get("/ui/users").status_code == 303


def test_the_session_cookie_is_httponly_strict_scoped_and_holds_no_key(console: Console) -> None:
    response = console.login(ADMIN_KEY, next="/ui/queue")
    assert response.status_code == 303 and response.headers["location"] == "/ui/queue"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("mg_console="))
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert "Path=/ui" in cookie and "SameSite=strict" in cookie
    assert "secure" not in attributes  # plain http here; https adds Secure
    value = cookie.split(";")[0].split("=", 1)[1]
    assert ADMIN_KEY not in value and ADMIN_KEY not in json.dumps(value)
    assert console.get("/ui/queue").status_code == 200


def test_login_redirects_only_inside_the_console(console: Console) -> None:
    for target in ("https://evil.example/", "//evil.example/ui/", "/v1/memories"):
        console.http.cookies.clear()
        assert console.login(ADMIN_KEY, next=target).headers["location"] == "/ui/"


def test_logout_clears_the_cookie(admin: Console) -> None:
    response = admin.submit("/ui/users", "/ui/logout")
    assert response.status_code == 303
    assert (
        'mg_console=""' in response.headers["set-cookie"]
        or "Max-Age=0" in (response.headers["set-cookie"])
    )
    assert admin.get("/ui/users").status_code == 303


def test_a_forged_or_tampered_cookie_is_no_session(console: Console, admin: Console) -> None:
    value = admin.http.cookies["mg_console"]
    version, payload, mac = value.split(".")
    other = Console(admin.gateway)
    try:
        other.http.cookies.set("mg_console", f"{version}.{payload}.{mac[:-2]}AA", path="/ui")
        assert other.get("/ui/users").status_code == 303
    finally:
        other.close()


# -- CSRF and origins ---------------------------------------------------------------


def test_posts_without_or_with_a_wrong_csrf_token_are_refused(admin: Console) -> None:
    add_memory(admin.gateway, "bob", "Plays chess")
    [memory] = memories_of(admin.gateway, "bob")
    action = f"/ui/users/bob/memories/{memory['id']}/delete"
    missing = admin.http.post(action, data={})
    wrong = admin.http.post(action, data={"csrf_token": "A" * 43})
    assert missing.status_code == wrong.status_code == 403
    assert "CSRF" in wrong.text and "text/html" in wrong.headers["content-type"]
    assert [m["id"] for m in memories_of(admin.gateway, "bob")] == [memory["id"]]
    # Another session's token is no good either.
    other = Console(admin.gateway)
    try:
        other.login(ADMIN_KEY)
        token = csrf_of(other.get("/ui/users").text)
        assert admin.http.post(action, data={"csrf_token": token}).status_code == 403
    finally:
        other.close()
    assert admin.submit("/ui/users/bob", action).status_code == 303
    assert memories_of(admin.gateway, "bob") == []


def test_posts_from_a_foreign_origin_are_refused(admin: Console) -> None:
    token = csrf_of(admin.get("/ui/queue").text)
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "https://sub.example"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    ):
        response = admin.http.post("/ui/queue/retry", data={"csrf_token": token}, headers=headers)
        assert response.status_code == 403, headers
    for headers in (
        {"Origin": admin.gateway.url},
        # Chromium under Referrer-Policy: no-referrer, same origin.
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
    ):
        same = admin.http.post("/ui/queue/retry", data={"csrf_token": token}, headers=headers)
        assert same.status_code == 303, headers


def test_the_login_form_itself_needs_its_csrf_cookie(console: Console) -> None:
    console.get("/ui/login")
    response = console.http.post("/ui/login", data={"csrf_token": "guess", "key": ADMIN_KEY})
    assert response.status_code == 403
    assert "mg_console=" not in response.headers.get("set-cookie", "")


# -- who sees what ------------------------------------------------------------------


def test_a_per_user_key_opens_its_own_user_only(console: Console) -> None:
    add_memory(console.gateway, "alice", "Has a cat named Miso")
    add_memory(console.gateway, "bob", "Secret of bob")
    response = console.login(ALICE_KEY)
    assert response.status_code == 303 and response.headers["location"] == "/ui/users/alice"
    own = console.get("/ui/users/alice")
    assert own.status_code == 200 and "Has a cat named Miso" in own.text
    assert "/ui/queue" not in own.text  # no admin navigation
    for path in ("/ui/users/bob", "/ui/users", "/ui/queue", "/ui/requests", "/ui/users/bob/export"):
        refused = console.get(path)
        assert refused.status_code == 403, path
        assert "Secret of bob" not in refused.text
    [bob] = memories_of(console.gateway, "bob")
    assert console.get(f"/ui/users/bob/memories/{bob['id']}").status_code == 403
    # alice's scope does not hold bob's id either way.
    assert console.get(f"/ui/users/alice/memories/{bob['id']}").status_code == 404
    erase = console.submit("/ui/users/alice", "/ui/users/bob/erase", confirm="bob")
    assert erase.status_code == 403
    assert len(memories_of(console.gateway, "bob")) == 1


def test_a_revoked_issued_key_ends_its_session(console: Console) -> None:
    created = api(console.gateway, "POST", "/v1/keys", json={"user_id": "carol"}).json()
    add_memory(console.gateway, "carol", "Collects stamps")
    assert console.login(created["key"]).status_code == 303
    assert created["key"] not in console.http.cookies["mg_console"]
    assert console.get("/ui/users/carol").status_code == 200
    assert api(console.gateway, "DELETE", f"/v1/keys/{created['id']}").status_code == 200
    response = console.get("/ui/users/carol")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/ui/login?next=")
    assert "ended=1" in response.headers["location"]
    assert console.login(created["key"]).status_code == 401


# -- pages --------------------------------------------------------------------------


def test_memory_text_is_escaped_everywhere(admin: Console) -> None:
    memory = add_memory(admin.gateway, "mallory", XSS_TEXT, agent_id="<b>agent</b>")
    pages = [
        admin.get("/ui/users/mallory"),
        admin.get("/ui/users/mallory?q=tea&mode=text"),
        admin.get(f"/ui/users/mallory/memories/{memory['id']}"),
    ]
    for page in pages:
        assert page.status_code == 200
        assert "<script>window.__xss" not in page.text
        assert "<img src=x" not in page.text
        assert "<b>agent</b>" not in page.text
        assert html.escape(XSS_TEXT, quote=False).replace('"', "&#34;") in page.text
    csp = pages[0].headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert pages[0].headers["x-frame-options"] == "DENY"
    assert pages[0].headers["referrer-policy"] == "no-referrer"


def test_add_search_edit_history_delete(admin: Console) -> None:
    page = "/ui/users/dana"
    response = admin.submit("/ui/users", page + "/memories", text="Lives in Lisbon", agent_id="a1")
    assert response.status_code == 303 and response.headers["location"] == page + "?done=added"
    assert "Memory added." in admin.get(response.headers["location"]).text
    admin.submit(page, page + "/memories", text="Allergic to peanuts")
    listed = admin.get(page)
    assert "Lives in Lisbon" in listed.text and "Allergic to peanuts" in listed.text

    semantic = admin.get(page, params={"q": "peanut allergy"})
    first = re.search(r'<td class="text">([^<]*)</td>', semantic.text)
    assert first and first.group(1) == "Allergic to peanuts"
    assert '<th class="num">Score</th>' in semantic.text
    text = admin.get(page, params={"q": "lisbon", "mode": "text"})
    assert "Lives in Lisbon" in text.text and "Allergic to peanuts" not in text.text
    by_agent = admin.get(page, params={"agent": "a1"})
    assert "Lives in Lisbon" in by_agent.text and "Allergic to peanuts" not in by_agent.text

    memory = next(m for m in memories_of(admin.gateway, "dana") if m["text"] == "Lives in Lisbon")
    detail = f"{page}/memories/{memory['id']}"
    edited = admin.submit(detail, detail + "/edit", text="Lives in Porto")
    assert edited.status_code == 303 and edited.headers["location"] == detail + "?done=updated"
    history = admin.get(detail)
    assert "Lives in Porto" in history.text
    rows = re.findall(r'<span class="event (\w+)">', history.text)
    assert rows == ["add", "update"]
    assert "Lives in Lisbon" in history.text  # the old text, in the UPDATE row

    deleted = admin.submit(detail, detail + "/delete")
    assert deleted.status_code == 303 and deleted.headers["location"] == page + "?done=deleted"
    assert "Lives in Porto" not in admin.get(page).text
    gone = admin.get(detail)
    assert gone.status_code == 200 and "no longer exists" in gone.text
    assert re.findall(r'<span class="event (\w+)">', gone.text) == ["add", "update", "delete"]


def test_users_list_search_and_last_activity(admin: Console) -> None:
    for user, n in (("erin", 2), ("eric", 1), ("zoe", 1)):
        for i in range(n):
            add_memory(admin.gateway, user, f"fact {i} of {user}")
    listed = admin.get("/ui/users")
    assert listed.status_code == 200
    assert re.findall(r'<a href="/ui/users/(\w+)">', listed.text) == ["erin", "eric", "zoe"]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", listed.text)
    found = admin.get("/ui/users", params={"q": "ER"})
    assert re.findall(r'<a href="/ui/users/(\w+)">', found.text) == ["erin", "eric"]
    opened = admin.get("/ui/open-user", params={"id": "zoe"})
    assert opened.status_code == 303 and opened.headers["location"] == "/ui/users/zoe"


def test_user_ids_that_a_path_cannot_carry_still_open(admin: Console) -> None:
    for user in ("org/alice", "..", "~tilde", "50%"):
        add_memory(admin.gateway, user, f"memory of {user}")
        location = admin.get("/ui/open-user", params={"id": user}).headers["location"]
        page = admin.get(location)
        assert page.status_code == 200, (user, location)
        assert html.escape(f"memory of {user}") in page.text


def test_a_missing_user_or_memory_is_a_404_page(admin: Console) -> None:
    missing = admin.get("/ui/users/nobody")
    assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
    assert "has no memories" in missing.text
    assert admin.get("/ui/users/nobody/memories/nope").status_code == 404
    invalid = admin.get("/ui/users/" + "x" * 300)
    assert invalid.status_code == 400 and "<html" in invalid.text


def test_export_downloads_json_lines(admin: Console) -> None:
    add_memory(admin.gateway, "fred", "Speaks Korean")
    add_memory(admin.gateway, "fred", "Drives a blue car")
    response = admin.get("/ui/users/fred/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.headers["content-disposition"] == 'attachment; filename="memories-fred.jsonl"'
    from_api = api(admin.gateway, "GET", "/v1/memories/export", params={"user_id": "fred"})
    assert response.text == from_api.text
    assert {json.loads(line)["text"] for line in response.text.splitlines()} == {
        "Speaks Korean",
        "Drives a blue car",
    }


def test_erase_needs_the_typed_user_id(admin: Console) -> None:
    add_memory(admin.gateway, "gina", "Runs marathons")
    page = "/ui/users/gina"
    wrong = admin.submit(page, page + "/erase", confirm="gin")
    assert wrong.status_code == 303 and wrong.headers["location"] == page + "?problem=confirm"
    assert "type the user id exactly" in admin.get(wrong.headers["location"]).text
    assert len(memories_of(admin.gateway, "gina")) == 1
    erased = admin.submit(page, page + "/erase", confirm="gina")
    assert erased.status_code == 303 and erased.headers["location"] == "/ui/users?done=erased"
    assert memories_of(admin.gateway, "gina") == []
    assert admin.get(page).status_code == 404


def missing_model(request: Recorded) -> JSONReply | None:
    if not is_extraction(request):
        return None
    error = {
        "message": "The model `gpt-4o-mini` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    return JSONReply({"error": error}, status=404)


class Extraction:
    """The scripted extraction model: fails (model not found) until told to
    remember, then adds `fact`."""

    def __init__(self, fact: str) -> None:
        self.fact = fact
        self.failing = True

    def __call__(self, request: Recorded) -> JSONReply | None:
        if not is_extraction(request):
            return None
        if self.failing:
            return missing_model(request)
        return llm_answer([{"op": "ADD", "text": self.fact}])


def failed_job(gateway: GatewayServer, user: str, text: str) -> dict[str, Any]:
    """Queue an extraction for `user` and wait until it has failed."""
    queued = api(gateway, "POST", "/v1/memories", json={"user_id": user, "text": text})
    assert queued.status_code == 201, queued.text

    def failed() -> list[dict[str, Any]]:
        jobs = api(gateway, "GET", "/v1/memories/jobs", params={"state": "failed"}).json()
        return [j for j in jobs["data"] if j["user_id"] == user]

    [job] = wait_for(failed)
    return job


def test_queue_shows_failed_jobs_and_retries_them(
    admin: Console, upstream: ScriptedUpstream
) -> None:
    extraction = Extraction("Lives in Oslo")
    upstream.script(extraction)
    job = failed_job(admin.gateway, "hana", "I live in Oslo")
    queue = admin.get("/ui/queue")
    assert queue.status_code == 200
    assert job["id"] in queue.text and "model_not_found" in queue.text
    assert "does not exist" in queue.text
    for label in ("Active memories", "Data directory", "Last maintenance", "version(s) kept"):
        assert label in queue.text
    # The user's page offers the retry too.
    assert "1 failed extraction job(s)" in admin.get("/ui/users/hana").text

    extraction.failing = False
    retried = admin.submit("/ui/queue", "/ui/queue/retry")
    assert retried.status_code == 303 and retried.headers["location"].endswith("n=1")
    assert "1 failed job(s) put back" in admin.get(retried.headers["location"]).text
    wait_for(lambda: memories_of(admin.gateway, "hana"))
    assert "Lives in Oslo" in admin.get("/ui/users/hana").text


def test_recent_requests_show_no_user_until_opened(admin: Console) -> None:
    state = admin.gateway.app.state
    recent = state.get("recent_requests")
    if recent is None:
        recent = state.recent_requests = RecentRequests()
    empty = admin.get("/ui/requests")
    assert empty.status_code == 200
    record = RequestRecord(
        id=recent.next_id(),
        at=time.time(),
        path="/v1/chat/completions",
        model="gpt-test",
        upstream="scripted",
        status=200,
        memory_status="degraded",
        injected=3,
        stream=True,
        user_id="secret-user-id",
        duration_ms=12.5,
    )
    recent.add(record)
    listed = admin.get("/ui/requests")
    assert "gpt-test" in listed.text and "degraded" in listed.text
    assert "secret-user-id" not in listed.text
    live = admin.get("/ui/requests?live=true")
    assert '<meta http-equiv="refresh" content="3">' in live.text
    opened = admin.get(f"/ui/requests/{record.id}")
    assert opened.status_code == 200 and "secret-user-id" in opened.text
    assert admin.get("/ui/requests/999999").status_code == 404


# -- without an admin key, or without memory -----------------------------------------


def test_a_local_client_needs_no_login_without_an_admin_key(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(gateway_config_for(upstream.url, tmp_path / "data", memory={}))
    add_memory(gateway, "ivan", "Likes jazz")
    console = Console(gateway)
    try:
        assert console.get("/ui/").headers["location"] == "/ui/users"
        page = console.get("/ui/users/ivan")
        assert page.status_code == 200 and "Likes jazz" in page.text
        assert "mg_console_csrf=" in page.headers["set-cookie"]  # the double-submit token
        [memory] = memories_of(gateway, "ivan")
        action = f"/ui/users/ivan/memories/{memory['id']}/delete"
        assert console.http.post(action, data={"csrf_token": "guess"}).status_code == 403
        assert console.submit("/ui/users/ivan", action).status_code == 303
        # A foreign Host (DNS rebinding) is no local client: the login form.
        rebound = console.get("/ui/users/ivan", headers={"Host": "evil.example"})
        assert rebound.status_code == 303 and rebound.headers["location"].startswith("/ui/login")
    finally:
        console.close()


def test_memory_off_says_so(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(gateway_config_for(upstream.url, tmp_path / "data"))
    console = Console(gateway)
    try:
        home = console.get("/ui/")
        assert home.status_code == 200 and "memory is disabled" in home.text
        users = console.get("/ui/users")
        assert users.status_code == 404 and "memory is disabled" in users.text
        assert "<html" in users.text
        assert console.get("/ui/requests").status_code == 200
    finally:
        console.close()


def test_an_unknown_console_path_is_a_404_page(admin: Console) -> None:
    # (A wrong path below a real page, /ui/users/x/nope, gets the app's JSON 404:
    # Litestar's router does not fall back to a catch-all from inside a route.)
    for path in ("/ui/nope", "/ui/nope/deeper"):
        response = admin.get(path)
        assert response.status_code == 404 and "<html" in response.text, path
    assert admin.get("/ui/static/console.css").status_code == 200
