"""`server.workers` and `server.extraction`: several gateway processes on one
port and one data directory, with or without an extraction process.

The spool and the store are shared on disk; these tests hold the promises that
must survive the split: every completed exchange processed exactly once, one
user's exchanges processed in the order they were made, each with its user's
own key, a dead process replaced, and a clean stop of the whole gateway.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.extraction import is_extraction, latest_exchange, wait_for
from tests.reliability import (
    TOKEN,
    GatewayProcess,
    memory_settings,
    new_token,
    post_token_exchange,
    spool_drained,
    token_extractor,
)
from tests.upstream import ScriptedUpstream

USERS = ["ann", "ben", "cem", "dan"]
PER_USER = 12


def children(pid: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    workers = []
    for child in path.read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(int(child))
    return workers


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers_config(
    upstream: ScriptedUpstream, tmp_path: Path, workers: int, extraction: str = "inline"
) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "scripted", "base_url": upstream.url, "default": True}],
        "data_dir": str(tmp_path / "data"),
        "server": {"log_level": "warning", "workers": workers, "extraction": extraction},
        "memory": memory_settings(upstream.url),
    }


def chat(url: str, user: str, token: str, stream: bool, key: str | None = None) -> None:
    # A new connection per request, so the kernel spreads them over the workers.
    with httpx.Client(base_url=url, timeout=30) as http:
        response = post_token_exchange(http, user, token, stream, key)
    assert response.status_code == 200, response.text
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")


def chat_concurrently(url: str, per_user: int, *, own_keys: bool = False) -> dict[str, list[str]]:
    """Each user's exchanges one after the other, as a chat app makes them, all
    users at once; the tokens each user sent, in order."""
    sent: dict[str, list[str]] = {user: [] for user in USERS}

    def one_user(user: str) -> None:
        for i in range(per_user):
            token = new_token()
            key = user_key(user) if own_keys else None
            chat(url, user, token, stream=i % 2 == 1, key=key)
            sent[user].append(token)

    threads = [threading.Thread(target=one_user, args=(u,)) for u in USERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return sent


def user_key(user: str) -> str:
    return f"sk-own-key-of-{user}"


def check_extracted(
    gateway: GatewayProcess,
    upstream: ScriptedUpstream,
    sent: dict[str, list[str]],
    *,
    own_keys: bool = False,
) -> None:
    """Every token once, each user's in order (first sight: a job replayed after
    a lost lease may ask the model again); with `own_keys`, each extracted with
    its user's key."""
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        wait_for(lambda: spool_drained(http), timeout=120, interval=0.2)
        memories = {
            user: http.get("/v1/memories", params={"user_id": user, "limit": 1000}).json()["data"]
            for user in sent
        }
        assert http.get("/v1/memories/jobs", params={"state": "failed"}).json()["data"] == []
    owner = {token: user for user, tokens in sent.items() for token in tokens}
    order: dict[str, list[str]] = {user: [] for user in sent}
    for request in upstream.requests:
        if is_extraction(request):
            for token in TOKEN.findall(latest_exchange(request)):
                user = owner[token]
                if own_keys:
                    assert request.headers["authorization"] == f"Bearer {user_key(user)}"
                if token not in order[user]:
                    order[user].append(token)
    for user, tokens in sent.items():
        facts = Counter(t for m in memories[user] for t in TOKEN.findall(m["text"]))
        assert sorted(facts) == sorted(tokens), f"{user}: lost or foreign exchanges"
        assert set(facts.values()) == {1}, f"{user}: an exchange was processed twice"
        assert order[user] == tokens, f"{user}: processed out of order"


@pytest.fixture
def two_workers(upstream: ScriptedUpstream, tmp_path: Path):
    upstream.script(token_extractor)
    gateway = GatewayProcess(workers_config(upstream, tmp_path, 2), tmp_path)
    pids: list[int] = []
    try:
        gateway.start()
        assert gateway.process is not None
        wait_for(lambda: len(children(gateway.process.pid)) == 2, timeout=30)
        pids = children(gateway.process.pid)
        # /ready answered by one worker; both answer once both are up.
        for _ in range(20):
            assert httpx.get(gateway.url + "/ready", timeout=30).status_code == 200
        yield gateway
    finally:
        with contextlib.suppress(FileNotFoundError):
            if gateway.process is not None:
                pids += children(gateway.process.pid)
        gateway.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(240)
def test_two_workers_process_every_exchange_once_and_each_user_in_order(two_workers, upstream):
    gateway = two_workers
    assert gateway.process is not None
    pids = children(gateway.process.pid)
    before = {pid: cpu_seconds(pid) for pid in pids}
    sent = chat_concurrently(gateway.url, PER_USER)
    assert all(len(tokens) == PER_USER for tokens in sent.values())
    check_extracted(gateway, upstream, sent)
    used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    # Both processes did part of the work (requests and spool jobs).
    total = sum(used.values())
    assert all(share > 0.1 * total for share in used.values()), used

    # A supervisor killed outright leaves no orphan serving on.
    gateway.kill_supervisor()
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout=30)


@pytest.mark.timeout(180)
def test_a_dead_worker_is_replaced_and_sigterm_stops_every_worker(two_workers):
    gateway = two_workers
    assert gateway.process is not None
    victim, survivor = children(gateway.process.pid)
    os.kill(victim, signal.SIGKILL)
    # The survivor answers meanwhile.
    chat(gateway.url, "ann", new_token(), stream=False)
    wait_for(
        lambda: len(now := children(gateway.process.pid)) == 2 and victim not in now,
        timeout=60,
    )
    pids = children(gateway.process.pid)
    assert survivor in pids
    for _ in range(10):
        assert httpx.get(gateway.url + "/ready", timeout=30).status_code == 200
    chat(gateway.url, "ben", new_token(), stream=True)

    assert gateway.terminate() == 0, gateway.log()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert "Traceback" not in gateway.log()


# ---------- the extraction process (server.extraction: process) ----------


def started_pid(gateway: GatewayProcess, name: str) -> int:
    """The pid of the latest `name` the supervisor started (from its log)."""
    found = re.findall(rf"{name} started \(pid (\d+)\)", gateway.log())
    assert found, gateway.log()
    return int(found[-1])


def policies(pid: int) -> Counter[int]:
    """How many of a process's threads are at each scheduling policy."""
    found: Counter[int] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            found[os.sched_getscheduler(int(tid))] += 1
    return found


@pytest.fixture
def with_extraction_process(upstream: ScriptedUpstream, tmp_path: Path):
    """Two serving workers and the extraction process; no configured extraction
    key: each user's exchanges are extracted with the key of their requests."""
    upstream.script(token_extractor)
    config = workers_config(upstream, tmp_path, 2, extraction="process")
    config["server"]["log_level"] = "info"
    config["memory"]["llm"] = {}
    gateway = GatewayProcess(config, tmp_path)
    try:
        gateway.start()
        assert gateway.process is not None
        wait_for(lambda: len(children(gateway.process.pid)) == 3, timeout=30)
        for _ in range(10):
            assert httpx.get(gateway.url + "/ready", timeout=30).status_code == 200
        yield gateway
    finally:
        gateway.kill()


@pytest.mark.timeout(240)
def test_the_extraction_process_extracts_every_exchange_once_in_order_with_its_users_key(
    with_extraction_process, upstream
):
    gateway = with_extraction_process
    # Extraction is background work: every thread of its process is at idle
    # CPU priority but one, the spool's (it shares SQLite's write lock with
    # the serving processes); the serving processes at normal priority.
    extraction = started_pid(gateway, "extraction process")
    wait_for(lambda: policies(extraction)[os.SCHED_OTHER] == 1, timeout=30)
    assert set(policies(extraction)) == {os.SCHED_IDLE, os.SCHED_OTHER}
    serving = set(children(gateway.process.pid)) - {extraction}
    assert len(serving) == 2
    assert all(set(policies(pid)) == {os.SCHED_OTHER} for pid in serving)

    sent = chat_concurrently(gateway.url, PER_USER // 2, own_keys=True)
    check_extracted(gateway, upstream, sent, own_keys=True)

    # The serving processes only spool: with the extraction process stopped,
    # an exchange waits for it.
    os.kill(extraction, signal.SIGSTOP)
    try:
        token = new_token()
        chat(gateway.url, "ann", token, stream=False, key=user_key("ann"))
        sent["ann"].append(token)
        time.sleep(1.5)
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            assert http.get("/v1/memories/stats").json()["spool"]["pending"] == 1
    finally:
        os.kill(extraction, signal.SIGCONT)
    check_extracted(gateway, upstream, sent, own_keys=True)


@pytest.mark.timeout(240)
def test_a_killed_extraction_process_is_replaced_and_catches_up(with_extraction_process, upstream):
    gateway = with_extraction_process
    first = started_pid(gateway, "extraction process")
    os.kill(first, signal.SIGKILL)
    # Chat goes on meanwhile; these exchanges wait in the spool, and their
    # users' keys in the handoff socket, for the next extraction process.
    sent = {user: [new_token()] for user in USERS}
    for user, [token] in sent.items():
        chat(gateway.url, user, token, stream=False, key=user_key(user))
    wait_for(lambda: started_pid(gateway, "extraction process") != first, timeout=60)
    check_extracted(gateway, upstream, sent, own_keys=True)

    assert gateway.terminate() == 0, gateway.log()
    assert "Traceback" not in gateway.log()


@pytest.mark.timeout(240)
def test_the_extraction_process_uses_the_key_configured_on_the_extraction_upstream(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    """No `memory.llm.api_key`, but the upstream at the extraction endpoint
    has its own key: the extraction process sends that key (the rule in
    `Config.extraction`), not a client's, and needs no request to bring one."""
    upstream.script(token_extractor)
    config = workers_config(upstream, tmp_path, 1, extraction="process")
    config["upstreams"][0]["api_key"] = "sk-configured-upstream-key"
    config["memory"]["llm"] = {}
    gateway = GatewayProcess(config, tmp_path)
    try:
        gateway.start()
        token = new_token()
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            response = http.post(
                "/v1/memories",
                json={"user_id": "ann", "text": f"remember {token}"},
                params={"wait": "true"},
            )
            assert response.status_code == 201, response.text
            assert response.json()["job_state"] == "done", response.text
            stats = http.get("/v1/memories/stats").json()["extraction"]
        assert stats["key_source"] == "the api_key of upstream 'scripted'"
        calls = [r for r in upstream.requests if is_extraction(r)]
        assert calls
        assert {c.headers["authorization"] for c in calls} == {"Bearer sk-configured-upstream-key"}
    finally:
        gateway.kill()
