"""Screenshots of the web console's main pages, for docs/console.md.

Starts a gateway (memory on, an admin key) in front of the tests' scripted
upstream, fills it with a few users' memories, a failed extraction job and
some chat requests, then has Playwright drive the system's chromium through
the pages and save PNGs next to this file:

    python docs/console/screenshot.py          # from the repository root

Needs the test extra (playwright) and a chromium on PATH (apt-get install
chromium); nothing is downloaded.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.config import Config  # noqa: E402
from tests.extraction import is_extraction  # noqa: E402
from tests.gateway_server import GatewayServer  # noqa: E402
from tests.upstream import JSONReply, Recorded, ScriptedUpstream, ServerThread  # noqa: E402

OUT = Path(__file__).resolve().parent
ADMIN_KEY = "adm-screenshots"
MEMORIES = {
    "alice": [
        "Lives in Lisbon",
        "Allergic to peanuts",
        "Prefers answers in Portuguese",
        "Has a cat named Miso",
        "Works as a structural engineer",
    ],
    "bob": ["Plays chess on Sundays", "Is learning Korean"],
    "carol": ["Vegetarian", "Runs half-marathons", "Drives a blue Volvo"],
}


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


def seed(gateway: GatewayServer) -> str:
    """Memories, one edit, a failed job and a few chats; the edited memory's id."""
    admin = httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
    with admin:
        ids = {}
        for user, texts in MEMORIES.items():
            for text in texts:
                added = admin.post(
                    "/v1/memories", json={"user_id": user, "text": text, "infer": False}
                )
                ids[text] = added.json()["results"][0]["id"]
        edited = ids["Lives in Lisbon"]
        admin.put(
            f"/v1/memories/{edited}", params={"user_id": "alice"}, json={"text": "Lives in Porto"}
        )
        admin.post("/v1/memories", json={"user_id": "dave", "text": "I moved to Oslo"})
        deadline = time.monotonic() + 30
        while not admin.get("/v1/memories/jobs", params={"state": "failed"}).json()["data"]:
            if time.monotonic() > deadline:
                raise SystemExit("the extraction job did not fail in time")
            time.sleep(0.05)
        for user, text in (("alice", "Where do I live?"), ("bob", "Hi"), (None, "Hello")):
            headers = {"Authorization": "Bearer sk-client"}
            if user:
                headers["X-User-Id"] = user
            admin.post(
                "/v1/chat/completions",
                headers=headers,
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]},
            )
    return str(edited)


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    upstream = ScriptedUpstream()
    upstream_server = ServerThread(upstream).start()
    upstream.url = upstream_server.url + "/v1"
    upstream.script(missing_model)
    with tempfile.TemporaryDirectory() as data:
        config = msgspec.convert(
            {
                "upstreams": [{"name": "openai", "base_url": upstream.url, "default": True}],
                "data_dir": data,
                "memory": {
                    "llm": {"api_key": "sk-extract"},
                    "spool": {"max_attempts": 1},
                },
                "auth": {"admin_key": ADMIN_KEY},
            },
            Config,
        )
        gateway = GatewayServer(config, None).start()
        try:
            edited = seed(gateway)
            shoot(gateway.url, chromium, edited)
        finally:
            gateway.stop()
            upstream_server.stop()


def shoot(url: str, chromium: str, edited: str) -> None:
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(url + "/ui/login")
        page.screenshot(path=OUT / "login.png")
        page.get_by_label("Key").fill(ADMIN_KEY)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(url + "/ui/users")
        pages = {
            "users.png": "/ui/users",
            "user.png": "/ui/users/alice?q=where+does+she+live",
            "memory.png": f"/ui/users/alice/memories/{edited}",
            "queue.png": "/ui/queue",
            "requests.png": "/ui/requests",
        }
        for name, path in pages.items():
            page.goto(url + path)
            page.screenshot(path=OUT / name, full_page=True)
            print("saved", OUT / name)
        browser.close()


if __name__ == "__main__":
    main()
