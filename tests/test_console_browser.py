"""The console in a real browser: Playwright driving Debian's chromium clicks
through logging in, finding a user, searching, editing a memory, reading its
history, deleting it and retrying a failed extraction job, and checks that
memories holding `<script>` and `<img onerror>` stay inert.

Skips (saying why) where the `playwright` package or a chromium binary is
missing; .ci/run installs chromium with apt. Playwright's own browser
download is not used: the system's chromium is launched by path.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.extraction import wait_for
from tests.gateway_server import GatewayServer
from tests.test_console import (
    ADMIN_KEY,
    XSS_TEXT,
    Extraction,
    add_memory,
    console_config,
    failed_job,
    memories_of,
)
from tests.upstream import ScriptedUpstream

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (test extra)"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (apt-get install chromium; .ci/run does it in CI)",
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    yield opened
    context.close()


def test_click_through_the_console(
    page: Any,
    start_gateway: Callable[..., GatewayServer],
    upstream: ScriptedUpstream,
    tmp_path: Path,
) -> None:
    expect = sync_api.expect
    extraction = Extraction("Lives in Oslo")
    upstream.script(extraction)
    gateway = start_gateway(console_config(upstream, tmp_path / "data"))
    add_memory(gateway, "alice", "Lives in Lisbon")
    add_memory(gateway, "alice", "Allergic to peanuts")
    add_memory(gateway, "alice", XSS_TEXT)
    add_memory(gateway, "bob", "Plays chess")
    job = failed_job(gateway, "hana", "I moved to Oslo")

    dialogs: list[str] = []
    csp_errors: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on(
        "console",
        lambda message: (
            csp_errors.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )

    # Log in with the admin key.
    page.goto(gateway.url + "/ui/")
    expect(page).to_have_url(gateway.url + "/ui/login?next=%2Fui")
    page.get_by_label("Key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(gateway.url + "/ui/users")
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["mg_console"]["httpOnly"] and cookies["mg_console"]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # nothing a script could read

    # Find a user.
    page.get_by_placeholder("Search user ids").fill("ali")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("link", name="bob")).to_have_count(0)
    page.get_by_role("link", name="alice").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("alice")

    # The stored payloads render as text, and run nothing.
    expect(page.get_by_text("<script>window.__xss = 1</script>", exact=False)).to_be_visible()
    assert page.evaluate("window.__xss") is None
    assert page.locator("main img").count() == 0

    # Search.
    page.get_by_placeholder("Search memories").fill("Lisbon")
    page.get_by_role("button", name="Search").click()
    row = page.locator("table.memories tbody tr").filter(has_text="Lives in Lisbon")
    expect(row).to_have_count(1)

    # Edit the memory, then see its history.
    row.get_by_role("link", name="open").click()
    page.get_by_label("Text").fill("Lives in Porto")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".notice")).to_have_text("Memory updated.")
    history = page.locator("table.history tbody tr")
    expect(history).to_have_count(2)
    expect(history.nth(0)).to_contain_text("ADD")
    expect(history.nth(1)).to_contain_text("UPDATE")
    expect(history.nth(1)).to_contain_text("Lives in Lisbon")
    expect(history.nth(1)).to_contain_text("Lives in Porto")
    memory_url = page.url.split("?")[0]

    # Delete it: gone from the list, its history says so.
    page.get_by_role("button", name="Delete this memory").click()
    expect(page.locator(".notice")).to_contain_text("Memory deleted.")
    expect(page.locator("table.memories")).not_to_contain_text("Lives in Porto")
    page.goto(memory_url)
    expect(page.locator("table.history tbody tr").nth(2)).to_contain_text("DELETE")

    # Retry the failed job from the queue page.
    page.get_by_role("link", name="Queue").click()
    failed_row = page.locator("table.jobs tr").filter(has_text=job["id"])
    expect(failed_row).to_contain_text("model_not_found")
    extraction.failing = False
    page.get_by_role("button", name="Retry all failed jobs").click()
    expect(page.locator(".notice")).to_have_text("1 failed job(s) put back in the queue.")
    wait_for(lambda: memories_of(gateway, "hana"))
    page.goto(gateway.url + "/ui/users/hana")
    expect(page.locator("table.memories")).to_contain_text("Lives in Oslo")

    # Back on the page with the payloads: still inert, no dialog ever opened.
    page.goto(gateway.url + "/ui/users/alice")
    expect(page.get_by_text('<img src=x onerror="window.__xss = 2">', exact=False)).to_be_visible()
    assert page.evaluate("window.__xss") is None
    assert dialogs == [] and csp_errors == []

    # Logout ends the session.
    page.get_by_role("button", name="Logout").click()
    expect(page).to_have_url(gateway.url + "/ui/login?ended=0")
    page.goto(gateway.url + "/ui/users")
    expect(page.get_by_label("Key")).to_be_visible()
