"""Storage faults: an unwritable data directory, a full disk, a corrupt spool file.

Chat fails open: whatever happens to the disk, the answer arrives. What memory
cannot do is said once, clearly: one line at start-up, an ERROR log line at
runtime, never a traceback wall or a crash loop.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.extraction import wait_for
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import memory_settings, new_token, token_extractor
from tests.upstream import ScriptedUpstream

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


def serve_once(tmp_path: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "upstreams: [{name: u, base_url: 'http://127.0.0.1:9/v1', default: true}]\n"
        f"data_dir: {str(data_dir)!r}\n"
        "memory: {embedder: {provider: openai, base_url: 'http://127.0.0.1:9/v1'}}\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def unwritable_dirs(tmp_path: Path) -> list[Path]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    dirs = [blocker / "data"]
    # Permission bits bind everyone but root (CI containers often run as root).
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        dirs.append(locked / "data")
    return dirs


def test_an_unwritable_data_dir_stops_serve_with_one_line_and_exit_2(tmp_path: Path) -> None:
    for data_dir in unwritable_dirs(tmp_path):
        result = serve_once(tmp_path, data_dir)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "data_dir" in lines[0] and str(data_dir) in lines[0]
        # Says why: under a file, or not writable.
        assert "a parent of it is a file" in lines[0] or "not writable" in lines[0]
        assert "Traceback" not in result.stderr + result.stdout


@pytest.fixture
def extracting_upstream(upstream: ScriptedUpstream) -> ScriptedUpstream:
    upstream.script(token_extractor)
    return upstream


@pytest.fixture
def start_memory_gateway(
    start_gateway: Callable[..., GatewayServer],
    extracting_upstream: ScriptedUpstream,
    tmp_path: Path,
) -> Callable[[], GatewayServer]:
    def start() -> GatewayServer:
        config = gateway_config_for(
            extracting_upstream.url,
            tmp_path / "data",
            memory=memory_settings(extracting_upstream.url),
        )
        return start_gateway(config)

    return start


@pytest.fixture
def gateway(start_memory_gateway: Callable[[], GatewayServer]) -> GatewayServer:
    return start_memory_gateway()


@pytest.fixture
def http(gateway: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def chat(http: httpx.Client, user: str, text: str, *, stream: bool) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}
    return http.post(CHAT, json=body, headers={"X-User-Id": user})


def facts(http: httpx.Client, user: str) -> list[str]:
    response = http.get("/v1/memories", params={"user_id": user})
    assert response.status_code == 200
    return [m["text"] for m in response.json()["data"]]


def assert_healthy(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200


def answer_text(response: httpx.Response) -> str:
    if not response.headers["content-type"].startswith("text/event-stream"):
        return str(response.json()["choices"][0]["message"]["content"])
    assert response.text.rstrip().endswith("data: [DONE]")
    parts = []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def assert_answered(response: httpx.Response, text: str) -> None:
    assert response.status_code == 200, response.text[:300]
    assert answer_text(response) == f"echo: {text}"


class Lines(logging.Handler):
    """Every message logged to one logger, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def log_of() -> Iterator[Callable[[str], Lines]]:
    attached: list[tuple[logging.Logger, Lines]] = []

    def attach(name: str) -> Lines:
        logger, lines = logging.getLogger(name), Lines()
        logger.addHandler(lines)
        attached.append((logger, lines))
        return lines

    yield attach
    for logger, lines in attached:
        logger.removeHandler(lines)


def disk_full(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_corrupt_spool_is_moved_aside_and_memory_starts_fresh(
    start_memory_gateway: Callable[[], GatewayServer],
    tmp_path: Path,
    log_of: Callable[[str], Lines],
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    garbage = b"\x00\xffnot sqlite at all\x13" * 2000
    (data / "spool.sqlite3").write_bytes(garbage)

    log = log_of("memory.spool")
    gateway = start_memory_gateway()
    [moved] = data.glob("spool.sqlite3.corrupt-*")
    assert moved.read_bytes() == garbage
    [error] = log.errors()
    assert "is corrupt" in error and moved.name in error

    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        assert_healthy(http)
        token = new_token()
        assert_answered(chat(http, "carol", f"remember {token}", stream=True), f"remember {token}")
        wait_for(lambda: facts(http, "carol") == [f"Remembers {token}"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_full_disk_on_the_spool_loses_memory_loudly_not_the_answer(
    gateway: GatewayServer,
    http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    log_of: Callable[[str], Lines],
    stream: bool,
) -> None:
    spool = gateway.app.state.hooks.engine.spool

    async def full(*args: Any, **kwargs: Any) -> Any:
        # What sqlite3 raises when a write hits ENOSPC.
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(spool, "enqueue", full)
    lost = new_token()
    log = log_of("gateway.memory")
    response = chat(http, "dave", f"remember {lost}", stream=stream)
    assert_answered(response, f"remember {lost}")
    assert response.headers["X-Memory-Status"] == "ok"
    [line] = log.errors()
    assert "NOT recorded" in line
    assert "'dave'" in line and "disk is full" in line
    assert_healthy(http)

    monkeypatch.undo()
    kept = new_token()
    assert_answered(chat(http, "dave", f"remember {kept}", stream=stream), f"remember {kept}")
    wait_for(lambda: facts(http, "dave") == [f"Remembers {kept}"])


def test_a_full_disk_on_reads_answers_degraded(
    gateway: GatewayServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.app.state.hooks.engine.store, "search", disk_full)
    for stream in (False, True):
        response = chat(http, "erin", "what do you know about me?", stream=stream)
        assert_answered(response, "what do you know about me?")
        assert response.headers["X-Memory-Status"] == "degraded"
    assert_healthy(http)


def test_a_full_disk_on_store_writes_keeps_the_job_until_space_returns(
    gateway: GatewayServer,
    http: httpx.Client,
    extracting_upstream: ScriptedUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = gateway.app.state.hooks.engine
    monkeypatch.setattr(engine.store, "apply", disk_full)
    token = new_token()
    assert_answered(chat(http, "frank", f"remember {token}", stream=False), f"remember {token}")

    def retried() -> bool:
        jobs = http.get("/v1/memories/jobs", params={"user_id": "frank"}).json()["data"]
        return bool(jobs) and jobs[0]["attempts"] >= 2 and jobs[0]["state"] != "done"

    wait_for(retried)
    [job] = http.get("/v1/memories/jobs", params={"user_id": "frank"}).json()["data"]
    assert job["state"] in ("pending", "running")
    assert "No space left" in (job["last_error"] or "")
    assert facts(http, "frank") == []
    assert_healthy(http)

    monkeypatch.undo()
    wait_for(lambda: facts(http, "frank") == [f"Remembers {token}"])
    assert http.get("/v1/memories/stats").json()["spool"]["failed"] == 0


def test_a_data_dir_that_turns_read_only_answers_503_and_ready_says_so(
    gateway: GatewayServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is remounted read-only under a running gateway (simulated:
    root ignores permission bits, so the test makes the writes fail with
    EROFS as the kernel would). Management writes get a clear 503 in
    OpenAI's error shape, chat still answers, `/ready` stays 200 and names
    the problem, and all is well again once the disk is writable."""
    store = gateway.app.state.hooks.engine.store

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    real_access = os.access
    monkeypatch.setattr(store, "add", read_only)
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: False if mode == os.W_OK else real_access(path, mode)
    )
    response = http.post("/v1/memories", json={"user_id": "gus", "text": "x", "infer": False})
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "storage_unavailable"
    assert "Read-only file system" in error["message"] and "data directory" in error["message"]
    assert_answered(chat(http, "gus", "hello", stream=False), "hello")
    ready = http.get("/ready")
    assert ready.status_code == 200
    assert "not writable" in ready.json()["storage"]

    monkeypatch.undo()
    assert http.get("/ready").json() == {"status": "ready"}
    response = http.post("/v1/memories", json={"user_id": "gus", "text": "x", "infer": False})
    assert response.status_code == 201, response.text
